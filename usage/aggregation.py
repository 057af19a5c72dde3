"""Daily usage aggregation: raw ``UsageEvent`` rows → ``UsageDaily`` buckets, one per
(UTC day, workspace, user, server, tool).

Rerunnable by construction (Zulip ``analytics/lib/counts.py`` style):

* each day is rewritten in **one transaction**: lock the day's ``UsageDayState`` row, delete the
  day's buckets, insert them again with one ``INSERT … SELECT … GROUP BY`` computed by the
  database, mark the day ``partial`` or ``final`` — and, when final, hand the buckets to the
  billing hooks. A run that dies half-way rolls the day back to what it was, and the next run
  redoes it; running twice gives identical rows;
* the scheduled run (``run_scheduled``, Celery beat every ``USAGE_AGGREGATE_EVERY_SECONDS``)
  finalises every day that is over (plus ``USAGE_FINALIZE_GRACE_SECONDS``, for events still in
  flight at midnight) and not final yet — so days missed while workers were down are filled —
  then refreshes the partial aggregates of the days still open (today), covering the events
  created up to the grace period ago (``UsageDayState.covered_until``); the usage API adds the
  raw events after that, so it never has to scan a whole day of raw events;
* a day whose raw events retention has purged is never recomputed: its aggregates are the only
  record left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Min, Sum
from django.utils import timezone

from usage import billing
from usage.models import DayState, UsageDaily, UsageDayState, UsageEvent
from usage.queries import days_between, event_buckets, midnight

logger = logging.getLogger(__name__)

DAILY_COLUMNS = (
    "day", "workspace_id", "user_id", "server_id", "tool", "requests", "counted", "errors", "quota_rejections",
    "blocked", "timeouts", "upstream_errors", "client_disconnects", "tokens_in", "tokens_out", "bytes_in", "bytes_out",
    "latency_sum_ms", "latency_avg_ms", "latency_p95_ms", "first_at", "last_at",
)


@dataclass(frozen=True)
class DayResult:
    day: date
    state: str
    buckets: int = 0
    events: int = 0
    skipped: str = ""

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.day}: skipped ({self.skipped})"
        return f"{self.day}: {self.state}, {self.buckets} buckets from {self.events} events"


def last_finalisable_day(now: datetime) -> date:
    """The last day that may be finalised at ``now``: a day is over at 00:00 UTC the next day,
    plus the grace period for events still being written at midnight."""
    grace = timedelta(seconds=settings.USAGE_FINALIZE_GRACE_SECONDS)
    return (now - grace).date() - timedelta(days=1)


def covered_until(day: date, *, final: bool, now: datetime) -> datetime:
    """Up to when a fill of ``day`` aggregates events: the whole day once final; otherwise the
    events created before ``now`` minus the grace period, which are all committed by now (the
    same assumption finalisation makes). The usage API reads the raw events from there on."""
    end = midnight(day + timedelta(days=1))
    if final:
        return end
    grace = timedelta(seconds=settings.USAGE_FINALIZE_GRACE_SECONDS)
    return min(end, max(midnight(day), now - grace))


def _insert_buckets(day: date, until: datetime) -> tuple[int, int]:
    """INSERT the day's buckets (events before ``until``), aggregated by the database; returns
    (buckets, events)."""
    events = UsageEvent.objects.filter(created_at__gte=midnight(day), created_at__lt=until)
    select_sql, params = event_buckets(events, with_avg=True).query.sql_with_params()
    qn = connection.ops.quote_name
    columns = ", ".join(qn(c) for c in DAILY_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {qn(UsageDaily._meta.db_table)} ({columns}) {select_sql}", params)  # noqa: S608
    totals = UsageDaily.objects.filter(day=day).aggregate(buckets=Count("id"), events=Sum("requests"))
    return int(totals["buckets"] or 0), int(totals["events"] or 0)


def aggregate_day(day: date, *, final: bool, now: datetime | None = None) -> DayResult:
    """(Re)compute one day's buckets in one transaction; ``final`` marks the day final and runs
    the billing hooks (a hook that raises rolls the whole day back, to be redone next run)."""
    now = now or timezone.now()
    with transaction.atomic():
        UsageDayState.objects.bulk_create([UsageDayState(day=day)], ignore_conflicts=True)
        # The row lock serialises concurrent runs on the same day (PostgreSQL; SQLite serialises writes).
        state = UsageDayState.objects.select_for_update().get(day=day)
        if state.raw_purged_at is not None:
            return DayResult(day, state.state, state.buckets, state.events, skipped="raw events purged")
        final = final or state.state == DayState.FINAL  # a final day stays final
        until = covered_until(day, final=final, now=now)
        UsageDaily.objects.filter(day=day).delete()
        buckets, events = _insert_buckets(day, until)
        state.state = DayState.FINAL if final else DayState.PARTIAL
        state.filled_at = now
        state.covered_until = until
        state.buckets = buckets
        state.events = events
        state.save(update_fields=["state", "filled_at", "covered_until", "buckets", "events"])
        if state.state == DayState.FINAL:
            billing.run_hooks(day, UsageDaily.objects.filter(day=day))
    logger.info("usage aggregated for %s (%s): %d buckets, %d events", day, state.state, buckets, events)
    return DayResult(day, state.state, buckets, events)


def days_to_finalise(upto: date) -> list[date]:
    """Days up to ``upto`` that have raw events (or partial aggregates) but are not final: with
    a healthy beat that is just yesterday; after an outage, every day missed."""
    first_event = UsageEvent.objects.aggregate(first=Min("created_at"))["first"]
    first_partial = UsageDayState.objects.filter(state=DayState.PARTIAL, day__lte=upto).aggregate(
        first=Min("day"))["first"]
    starts = [d for d in (first_event and first_event.astimezone(UTC).date(), first_partial) if d]
    if not starts:
        return []
    start = min(starts)
    done = set(
        UsageDayState.objects.filter(day__gte=start, day__lte=upto).settled().values_list("day", flat=True)
    )
    return [day for day in days_between(start, upto) if day not in done]


def run_scheduled(now: datetime | None = None) -> list[DayResult]:
    """The beat job: finalise every finished day not final yet, then refresh the open days."""
    now = now or timezone.now()
    upto = last_finalisable_day(now)
    results = [aggregate_day(day, final=True, now=now) for day in days_to_finalise(upto)]
    results += [aggregate_day(day, final=False, now=now) for day in days_between(upto + timedelta(days=1),
                                                                                  now.date())]
    return results


def aggregate_days(first: date, last: date, *, now: datetime | None = None) -> list[DayResult]:
    """Operators (``manage.py aggregate_usage``): recompute the days in [first, last], final where
    the day is over, partial otherwise."""
    now = now or timezone.now()
    upto = last_finalisable_day(now)
    return [aggregate_day(day, final=day <= upto, now=now) for day in days_between(first, last)]
