"""``manage.py aggregate_usage [--day YYYY-MM-DD | --since YYYY-MM-DD]``: rebuild daily usage
aggregates. Without arguments it does what the beat job does: finalise every finished day not
final yet (days missed while workers were down included) and refresh today's figures."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from usage import aggregation
from usage.management.commands._dates import day_range


class Command(BaseCommand):
    help = ("Aggregate usage events into daily buckets. --day recomputes one UTC day, --since every day from "
            "then to today; days that are over are finalised (and billed), today stays partial. Safe to rerun.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--day", help="One UTC day, YYYY-MM-DD.")
        parser.add_argument("--since", help="Every UTC day from this one (YYYY-MM-DD) to today.")

    def handle(self, *args: Any, day: str | None, since: str | None, **options: Any) -> None:
        now = timezone.now()
        span = day_range(day, since, now.date())
        results = aggregation.run_scheduled(now) if span is None else aggregation.aggregate_days(*span, now=now)
        for result in results:
            self.stdout.write(str(result))
        if not results:
            self.stdout.write("Nothing to aggregate.")
