"""Delivery of finalised usage days to the export destinations, each day exactly once.

Celery beat runs ``run_scheduled`` every ``USAGE_EXPORT_EVERY_SECONDS``: for each enabled
destination, every settled day (final, see ``usage.aggregation``) from its ``start_day`` on that
is *due* is delivered, oldest first. A day is due when it was never delivered; when its last
attempt failed and its backoff is over; when a delivery was left running past its lease (the
worker died); or when it was re-aggregated since (``UsageDayState.filled_at`` changed).

One ``ExportDelivery`` row per destination and day records the state:

* claiming it is one transaction on the row lock, which also sets a lease
  (``USAGE_EXPORT_LEASE_SECONDS``) that the delivery renews after each batch of rows: two workers
  never deliver the same day at once, and a day whose worker was killed is taken again when the
  lease runs out;
* the attempt number is the fencing token: an attempt that lost its lease cannot record its
  result over a later one's;
* the sinks make a retried day replace what an earlier attempt wrote (``usage.export_files``,
  ``usage.export_clickhouse``), so a retry never duplicates rows.

Failures wait ``USAGE_EXPORT_RETRY_SECONDS`` doubled at each failure, at most
``USAGE_EXPORT_RETRY_MAX_SECONDS``. ``destinations_status`` gives operators (the admin page,
``manage.py deliver_usage --status`` and ``/metrics``) each destination's lag in days.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from external_mcp.crypto import DecryptionError
from usage.destinations import sink_for
from usage.export_clickhouse import ClickHouseError
from usage.export_rows import DayRows, day_rows
from usage.models import (
    DeliveryState,
    ExportDelivery,
    ExportDestination,
    ExportLevel,
    UsageDayState,
)
from usage.queries import days_between

logger = logging.getLogger(__name__)

ERROR_CHARS = 1000
SKIPPED = "skipped"
PURGED = "the raw events of this day were purged by retention before it could be delivered"


@dataclass(frozen=True)
class DeliveryResult:
    destination: str
    day: date
    state: str
    rows: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.destination} {self.day}: {self.state}"
        if self.rows is not None:
            text += f", {self.rows} rows"
        return f"{text} ({self.detail})" if self.detail else text


def retry_delay(failures: int) -> timedelta:
    seconds = settings.USAGE_EXPORT_RETRY_SECONDS * 2 ** max(failures - 1, 0)
    return timedelta(seconds=min(seconds, settings.USAGE_EXPORT_RETRY_MAX_SECONDS))


def _is_done(delivery: ExportDelivery | None, state: UsageDayState | None) -> bool:
    if delivery is None or state is None or not state.settled:
        return False
    if delivery.state == DeliveryState.UNAVAILABLE:
        return True
    return delivery.state == DeliveryState.DELIVERED and delivery.source_filled_at == state.filled_at


def _is_due(delivery: ExportDelivery | None, state: UsageDayState, now: datetime) -> bool:
    """Not done, and not waiting for a live lease or a backoff to end."""
    if delivery is None:
        return True
    if _is_done(delivery, state):
        return False
    if delivery.state == DeliveryState.RUNNING:
        return delivery.lease_until is None or delivery.lease_until <= now
    if delivery.state == DeliveryState.FAILED:
        return delivery.next_attempt_at is None or delivery.next_attempt_at <= now
    return True


def _settled_states(first: date, last: date) -> dict[date, UsageDayState]:
    return {state.day: state for state in UsageDayState.objects.filter(day__gte=first, day__lte=last).settled()}


def due_days(destination: ExportDestination, *, now: datetime) -> list[date]:
    states = _settled_states(destination.start_day, now.date())
    deliveries = {d.day: d for d in destination.deliveries.filter(day__gte=destination.start_day)}
    return [day for day in sorted(states) if _is_due(deliveries.get(day), states[day], now)]


def _claim(destination: ExportDestination, day: date, *, now: datetime,
           force: bool) -> tuple[ExportDelivery, UsageDayState] | None:
    with transaction.atomic():
        state = UsageDayState.objects.filter(day=day).first()
        if state is None or not state.settled:
            return None
        ExportDelivery.objects.bulk_create([ExportDelivery(destination=destination, day=day)], ignore_conflicts=True)
        delivery = ExportDelivery.objects.select_for_update().get(destination=destination, day=day)
        held = (delivery.state == DeliveryState.RUNNING and delivery.lease_until is not None
                and delivery.lease_until > now)
        if held or not (force or _is_due(delivery, state, now)):
            return None
        delivery.state = DeliveryState.RUNNING
        delivery.attempts += 1
        delivery.started_at = now
        delivery.lease_until = now + timedelta(seconds=settings.USAGE_EXPORT_LEASE_SECONDS)
        delivery.save(update_fields=["state", "attempts", "started_at", "lease_until"])
    return delivery, state


def _renew(delivery: ExportDelivery) -> None:
    lease = timezone.now() + timedelta(seconds=settings.USAGE_EXPORT_LEASE_SECONDS)
    ExportDelivery.objects.filter(pk=delivery.pk, attempts=delivery.attempts).update(lease_until=lease)


def _record(delivery: ExportDelivery, *, state: str, **fields: object) -> bool:
    """Record the attempt's outcome unless a later attempt took the day over (False then)."""
    with transaction.atomic():
        current = ExportDelivery.objects.select_for_update().filter(pk=delivery.pk).first()
        if current is None or current.attempts != delivery.attempts:
            return False
        current.state = state
        current.lease_until = None
        if state == DeliveryState.FAILED:
            current.failures += 1
            current.next_attempt_at = timezone.now() + retry_delay(current.failures)
        else:
            current.next_attempt_at = None
        for name, value in fields.items():
            setattr(current, name, value)
        current.save()
    return True


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ClickHouseError | DecryptionError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = f"{exc.__class__.__name__}: {exc}"
    return text[:ERROR_CHARS]


def deliver_day(destination: ExportDestination, day: date, *, now: datetime | None = None,
                force: bool = False) -> DeliveryResult:
    """Deliver one settled day if it is due (or ``force``), unless another worker holds it."""
    now = now or timezone.now()
    claimed = _claim(destination, day, now=now, force=force)
    if claimed is None:
        state = UsageDayState.objects.filter(day=day).first()
        settled = state is not None and state.settled
        why = "being delivered by another worker, or not due" if settled else "not finalised yet"
        return DeliveryResult(destination.name, day, SKIPPED, detail=why)
    delivery, state = claimed
    if destination.level == ExportLevel.EVENTS and state.raw_purged_at is not None:
        _record(delivery, state=DeliveryState.UNAVAILABLE, last_error=PURGED, source_filled_at=state.filled_at)
        return DeliveryResult(destination.name, day, DeliveryState.UNAVAILABLE, detail=PURGED)
    rows = DayRows(day_rows(destination.level, day, pseudonymize=destination.pseudonymize),
                   progress=lambda _count: _renew(delivery))
    try:
        sink_for(destination).deliver(day, destination.level, rows)
    except Exception as exc:  # any failure of the target is recorded and retried, never lost
        error = _error_text(exc)
        logger.warning("usage export to %s of %s failed (attempt %d): %s", destination.name, day,
                       delivery.attempts, error, exc_info=not isinstance(exc, ClickHouseError | OSError))
        _record(delivery, state=DeliveryState.FAILED, last_error=error)
        return DeliveryResult(destination.name, day, DeliveryState.FAILED, detail=error)
    _record(delivery, state=DeliveryState.DELIVERED, rows=rows.count, checksum=rows.checksum, last_error="",
            delivered_at=timezone.now(), source_filled_at=state.filled_at)
    logger.info("usage export to %s of %s: %d rows, sha256 %s", destination.name, day, rows.count, rows.checksum)
    return DeliveryResult(destination.name, day, DeliveryState.DELIVERED, rows=rows.count)


def run_scheduled(now: datetime | None = None) -> list[DeliveryResult]:
    """The beat job: every due day of every enabled destination, oldest first."""
    now = now or timezone.now()
    results = []
    for destination in ExportDestination.objects.enabled():
        results += [deliver_day(destination, day, now=now) for day in due_days(destination, now=now)]
    return results


def deliver_range(destinations: list[ExportDestination], first: date, last: date,
                  *, now: datetime | None = None) -> list[DeliveryResult]:
    """Operators (``manage.py deliver_usage``): deliver every day in [first, last] again now."""
    now = now or timezone.now()
    return [deliver_day(destination, day, now=now, force=True)
            for destination in destinations for day in days_between(first, last)]


def deliveries_redo(*, deliveries: list[ExportDelivery]) -> int:
    """Make days due now (the admin's action): the next run delivers them again, replacing them.
    A day whose raw events were purged stays unavailable at the events level."""
    return ExportDelivery.objects.filter(pk__in=[d.pk for d in deliveries]).exclude(
        state=DeliveryState.RUNNING).update(source_filled_at=None, next_attempt_at=None)


@dataclass(frozen=True)
class DestinationStatus:
    destination: ExportDestination
    lag_days: int
    oldest_pending: date | None
    failing_days: int
    failures: int
    last_delivered_at: datetime | None


def destinations_status(*, now: datetime | None = None) -> list[DestinationStatus]:
    """Each destination's lag: days from its oldest day still to deliver (not aggregated or not
    settled yet, or settled and not delivered as it is now) to today; 1 while yesterday waits, 0
    when up to date. Once usage is recorded, aggregation keeps a state row for every day: a day
    without one is aggregation falling behind, and counts. Three queries whatever the number of
    destinations."""
    now = now or timezone.now()
    destinations = list(ExportDestination.objects.all())
    if not destinations:
        return []
    first = min(d.start_day for d in destinations)
    states = {s.day: s for s in UsageDayState.objects.filter(day__gte=first, day__lt=now.date())}
    deliveries: dict[object, dict[date, ExportDelivery]] = defaultdict(dict)
    for delivery in ExportDelivery.objects.filter(day__gte=first):
        deliveries[delivery.destination_id][delivery.day] = delivery
    recorded_from = min(states, default=None)
    statuses = []
    for destination in destinations:
        mine = deliveries[destination.pk]
        days = days_between(max(destination.start_day, recorded_from), now.date() - timedelta(days=1)) \
            if recorded_from else []
        pending = [day for day in days if not _is_done(mine.get(day), states.get(day))]
        oldest = min(pending, default=None)
        delivered = [d.delivered_at for d in mine.values() if d.delivered_at is not None]
        statuses.append(DestinationStatus(
            destination=destination, lag_days=(now.date() - oldest).days if oldest else 0, oldest_pending=oldest,
            failing_days=sum(d.state == DeliveryState.FAILED for d in mine.values()),
            failures=sum(d.failures for d in mine.values()), last_delivered_at=max(delivered, default=None)))
    return statuses
