"""``manage.py deliver_usage (--day D | --since D [--until D]) [--destination NAME]…`` and
``manage.py deliver_usage --status``

Delivers finalised usage days to the export destinations now, replacing what they hold of those
days (each delivery replaces its day: nothing is duplicated). Without ``--destination``, every
enabled destination. Days not finalised yet are skipped and said so; the command exits with an
error when a delivery failed. ``--status`` prints each destination's lag and last failure.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from usage import delivery
from usage.management.commands._dates import day_range, parse_day
from usage.models import DeliveryState, ExportDestination


class Command(BaseCommand):
    help = "Deliver finalised usage days to the export destinations again, or show their status."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--day", help="One UTC day, YYYY-MM-DD.")
        parser.add_argument("--since", help="Every UTC day from this one (YYYY-MM-DD) on.")
        parser.add_argument("--until", help="With --since: the last day (default: yesterday).")
        parser.add_argument("--destination", action="append", default=[], help="A destination's name (repeatable).")
        parser.add_argument("--status", action="store_true", help="Print each destination's lag and state.")

    def handle(self, *args: Any, day: str | None, since: str | None, until: str | None, destination: list[str],
               status: bool, **options: Any) -> None:
        if status:
            self.print_status()
            return
        today = timezone.now().date()
        span = day_range(day, since, today)
        if span is None:
            raise CommandError("Give --day YYYY-MM-DD, --since YYYY-MM-DD or --status.")
        first, last = span
        if until:
            if not since:
                raise CommandError("--until goes with --since.")
            last = parse_day(until, "--until")
            if last < first:
                raise CommandError(f"--until: {last} is before --since {first}.")
        destinations = list(ExportDestination.objects.filter(name__in=destination) if destination
                            else ExportDestination.objects.enabled())
        missing = sorted(set(destination) - {d.name for d in destinations})
        if missing:
            raise CommandError(f"--destination: no destination named {', '.join(missing)}.")
        if not destinations:
            raise CommandError("No enabled export destination: add one in the admin (Usage › Export destinations).")
        results = delivery.deliver_range(destinations, first, min(last, today))
        for result in results:
            self.stdout.write(str(result))
        failed = [r for r in results if r.state == DeliveryState.FAILED]
        if failed:
            raise CommandError(f"{len(failed)} delivery(ies) failed; they are retried by the scheduler.")

    def print_status(self) -> None:
        statuses = delivery.destinations_status()
        if not statuses:
            self.stdout.write("No export destination.")
        for status in statuses:
            d = status.destination
            last = status.last_delivered_at.isoformat() if status.last_delivered_at else "never"
            self.stdout.write(
                f"{d.name} ({d.kind}, {d.level}{', disabled' if not d.enabled else ''}): lag {status.lag_days} "
                f"day(s), oldest pending {status.oldest_pending or '-'}, failing days {status.failing_days}, "
                f"last delivery {last}")
