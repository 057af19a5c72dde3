"""Retention: raw usage events older than ``EXTERNAL_MCP_USAGE_RETENTION_DAYS`` are deleted, the
daily aggregates are kept (forever). Runs daily from Celery beat (``usage.tasks.purge_usage``).

* A day's raw events are never deleted before the day is final: deletion stops at the first day
  that is not (the aggregation job was down, say) and logs a warning.
* Days are marked ``raw_purged_at`` *before* their events go, so an interrupted purge can never
  leave a day that the aggregation would recompute from half its events.
* Deletes go in bounded batches (``USAGE_RETENTION_BATCH_SIZE`` ids per ``DELETE``, each its own
  short transaction), so no long lock blocks the proxy's inserts.
* Quota counter rows (``QuotaCounter``, the database fallback of the limiter) older than
  ``USAGE_QUOTA_COUNTER_KEEP_DAYS`` days are deleted too; only today's row is ever read.
* Usage-alert breaches detected before the raw-event cutoff go as well: their only use is to
  notify once per window, and no rule evaluates a window that old again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db.models import Min, QuerySet
from django.utils import timezone

from usage.models import AlertBreach, DayState, QuotaCounter, UsageDayState, UsageEvent
from usage.queries import days_between, midnight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeResult:
    cutoff: date  # events before 00:00 UTC of this day were due
    boundary: date  # events before 00:00 UTC of this day were deleted (≤ cutoff)
    events_deleted: int
    counters_deleted: int
    batches: int
    breaches_deleted: int = 0

    def __str__(self) -> str:
        held = f" (held back at {self.boundary}: not finalised)" if self.boundary < self.cutoff else ""
        return (f"deleted {self.events_deleted} usage events before {self.boundary}{held} in {self.batches} "
                f"batches, {self.counters_deleted} quota counters, {self.breaches_deleted} alert breaches")


def purge_boundary(cutoff: date) -> date:
    """The first day whose events must stay: ``cutoff``, or an earlier day that is not final."""
    first = UsageEvent.objects.aggregate(first=Min("created_at"))["first"]
    if first is None:
        return cutoff
    first_day = first.astimezone(UTC).date()
    if first_day >= cutoff:
        return cutoff
    final = set(
        UsageDayState.objects.filter(day__gte=first_day, day__lt=cutoff).settled().values_list("day", flat=True)
    )
    for day in days_between(first_day, cutoff - timedelta(days=1)):
        if day not in final:
            return day
    return cutoff


def delete_in_batches(queryset: QuerySet, *, batch_size: int, pause: float = 0.0) -> tuple[int, int]:
    """Delete the queryset's rows ``batch_size`` primary keys at a time; (rows, batches)."""
    deleted = batches = 0
    model = queryset.model
    while True:
        ids = list(queryset.order_by().values_list("pk", flat=True)[:batch_size])
        if not ids:
            break
        count, _ = model.objects.filter(pk__in=ids).delete()
        deleted += count
        batches += 1
        if len(ids) < batch_size:
            break
        if pause:
            time.sleep(pause)
    return deleted, batches


def purge(now: datetime | None = None, *, batch_size: int | None = None, pause: float = 0.0) -> PurgeResult:
    now = now or timezone.now()
    today = now.date()
    batch_size = batch_size or settings.USAGE_RETENTION_BATCH_SIZE
    cutoff = today - timedelta(days=settings.EXTERNAL_MCP_USAGE_RETENTION_DAYS)
    boundary = purge_boundary(cutoff)
    if boundary < cutoff:
        logger.warning("usage retention: events from %s on are kept until that day is finalised "
                       "(is the usage aggregation job running?)", boundary)
    # Mark first: from here on these days are never recomputed from (possibly half-deleted) raw events.
    UsageDayState.objects.filter(day__lt=boundary, state=DayState.FINAL, raw_purged_at__isnull=True).update(
        raw_purged_at=now)
    events, batches = delete_in_batches(UsageEvent.objects.filter(created_at__lt=midnight(boundary)),
                                        batch_size=batch_size, pause=pause)
    keep_from = today - timedelta(days=settings.USAGE_QUOTA_COUNTER_KEEP_DAYS)
    counters, counter_batches = delete_in_batches(QuotaCounter.objects.filter(day__lt=keep_from),
                                                  batch_size=batch_size, pause=pause)
    breaches, breach_batches = delete_in_batches(AlertBreach.objects.filter(detected_at__lt=midnight(cutoff)),
                                                 batch_size=batch_size, pause=pause)
    result = PurgeResult(cutoff, boundary, events, counters, batches + counter_batches + breach_batches, breaches)
    logger.info("usage retention: %s", result)
    return result
