"""The daily quota's durable side, in the database: the committed uses a Redis counter is seeded
from, the epochs that start when Redis lost its counters, and the counters of an install without
Redis (``usage.models.QuotaCounter``, where a conditional UPDATE is the guarantee)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

import redis
from django.db import connection, transaction
from django.db.models import Count, F

from usage.quota import DATABASE, QuotaDecision, make_decision, peek_decision, settle_seconds
from usage.quota_redis import EPOCH_KEY, REDIS_ERRORS, RedisDown

logger = logging.getLogger("usage.limiter")  # the quota's one logger


def committed_uses(user_id: int, day: date) -> int:
    """The uses charged to ``user_id`` on ``day`` in committed usage events: the seed of a counter."""
    from usage.models import UsageEvent

    return UsageEvent.objects.counted_for(user_id=user_id, day=day).count()


def committed_uses_many(user_ids: Sequence[int], day: date) -> dict[int, int]:
    """``committed_uses`` for several users in one query (users without a use are left out)."""
    from usage.models import UsageEvent

    start = datetime.combine(day, dt_time.min, tzinfo=UTC)
    rows = (UsageEvent.objects.filter(user_id__in=user_ids, counted=True, created_at__gte=start,
                                      created_at__lt=start + timedelta(days=1))
            .order_by().values("user_id").annotate(uses=Count("id")).values_list("user_id", "uses"))
    return dict(rows)


# The PostgreSQL advisory lock that makes starting an epoch happen once, whoever finds Redis empty.
EPOCH_LOCK = 0x71C0_7A02


@contextmanager
def _epoch_lock() -> Iterator[None]:
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [EPOCH_LOCK])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [EPOCH_LOCK])


def epoch_start(client: redis.Redis, script: Any, now: datetime) -> None:
    """Record a new quota epoch and set Redis's marker, once: processes that find Redis empty
    together queue on a lock and all but the first find the marker set. The very first epoch
    waits for nothing (no call was ever admitted by Redis before it); a later one refuses capped
    plans until calls admitted before the reset have settled. The row is committed before the
    marker is set, so a marker never exists without the row that says an epoch began."""
    from usage.models import QuotaEpoch

    with _epoch_lock():
        try:
            if client.exists(EPOCH_KEY):
                return
        except REDIS_ERRORS as exc:
            raise RedisDown() from exc
        first = not QuotaEpoch.objects.exists()
        wait = 0 if first else settle_seconds()
        QuotaEpoch.objects.create(started_at=now, refuse_capped_until=now + timedelta(seconds=wait))
        try:
            script(keys=[EPOCH_KEY], args=[wait * 1000], client=client)
        except REDIS_ERRORS as exc:
            raise RedisDown() from exc
    if not first:
        logger.warning("Redis lost the quota counters (restarted empty or flushed): capped plans get 503 for %s s "
                       "while calls admitted before settle", wait)


def db_consume(user_id: int, limit: int | None, amount: int, now: datetime) -> QuotaDecision:
    from usage.models import QuotaCounter

    day = now.date()
    counter = QuotaCounter.objects.filter(user_id=user_id, day=day)
    # used + amount <= limit, in the WHERE clause: the database re-checks it on the locked row,
    # so concurrent calls cannot overshoot (PostgreSQL row lock; SQLite's write lock).
    target = counter if limit is None else counter.filter(used__lte=limit - amount)
    changes = {"used": F("used") + amount, "updated_at": now}
    with transaction.atomic():
        allowed = target.update(**changes) == 1
        if not allowed:
            # First use of the day (or over the limit): make sure the row exists, then retry.
            QuotaCounter.objects.bulk_create(
                [QuotaCounter(user_id=user_id, day=day, used=0, updated_at=now)], ignore_conflicts=True
            )
            allowed = target.update(**changes) == 1
        # Same transaction: our own update is visible and the row stays locked until commit.
        used = counter.values_list("used", flat=True).get()
    return make_decision(allowed=allowed, limit=limit, used=used, now=now, backend=DATABASE)


def db_refund(user_id: int, amount: int, day: date) -> None:
    from usage.models import QuotaCounter

    QuotaCounter.objects.filter(user_id=user_id, day=day, used__gte=amount).update(
        used=F("used") - amount, updated_at=datetime.now(UTC))


def db_peek(user_id: int, limit: int | None, now: datetime) -> QuotaDecision:
    from usage.models import QuotaCounter

    used = QuotaCounter.objects.filter(user_id=user_id, day=now.date()).values_list("used", flat=True).first()
    return peek_decision(limit, used or 0, now, DATABASE)


def db_peek_many(limits: Mapping[int, int | None], now: datetime) -> dict[int, QuotaDecision]:
    from usage.models import QuotaCounter

    used = dict(QuotaCounter.objects.filter(user_id__in=list(limits), day=now.date()).values_list("user_id", "used"))
    return {user_id: peek_decision(limit, used.get(user_id, 0), now, DATABASE) for user_id, limit in limits.items()}
