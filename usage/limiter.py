"""The daily quota on proxied MCP calls: at most N counted uses per user and UTC day.

A free-plan user gets ``settings.EXTERNAL_MCP_FREE_DAILY_LIMIT`` uses per UTC day across all
servers and workspaces; a pro-plan user is uncapped but still counted, so usage stays visible.
Days reset at 00:00 UTC.

The proxy calls ``get_limiter().aconsume(user_id, limit)`` on its hot path, so the Redis path is one
EVALSHA round trip: a Lua script increments the user's counter for the day, sets its expiry when it
creates it, and takes the increment back if it would pass the limit — atomic on the server, so
concurrent calls can never overshoot. Without Redis (the embedded SQLite demo) or while Redis is
unreachable, counters live in ``usage.models.QuotaCounter`` and a conditional UPDATE keeps the same
guarantee. If neither store answers, ``QuotaUnavailable`` is raised: the proxy answers 503 rather
than letting calls through uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections, connections, transaction
from django.db.models import F
from prometheus_client import Counter, Gauge
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

REDIS = "redis"
DATABASE = "database"

KEY_PREFIX = "twinmcp:quota"
# Keys outlive their day by this much, so a request that computed its key just before midnight
# still finds the right day's counter; the UTC date in the key keeps days apart anyway.
EXPIRY_GRACE_SECONDS = 3600
# The hot path must not wait long on a sick Redis: it falls back to the database instead.
REDIS_SOCKET_TIMEOUT = 0.5
# At most one "Redis is down" warning per this many seconds (per limiter, i.e. per process).
WARNING_INTERVAL_SECONDS = 60.0

FALLBACK_TOTAL = Counter(
    "external_mcp_quota_fallback",  # exposed as external_mcp_quota_fallback_total
    "Quota checks counted in the database because Redis was unreachable.",
)
FALLBACK_ACTIVE = Gauge(
    "external_mcp_quota_fallback_active",
    "1 while quota counters fall back to the database (Redis unreachable), 0 otherwise.",
    multiprocess_mode="livemax",
)

# KEYS[1]: the user's counter for one UTC day.
# ARGV[1]: amount (>= 1); ARGV[2]: limit (-1 = uncapped); ARGV[3]: seconds until the key expires.
# Returns {1, used after the call} when allowed, {0, used before the call} when refused
# (a refused call leaves the counter as it was).
REFUND_SCRIPT = """
local used = redis.call('DECRBY', KEYS[1], ARGV[1])
if used < 0 then redis.call('INCRBY', KEYS[1], -used) end
return used
"""

CONSUME_SCRIPT = """
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local used = redis.call('INCRBY', KEYS[1], amount)
if redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if limit >= 0 and used > limit then
  redis.call('DECRBY', KEYS[1], amount)
  return {0, used - amount}
end
return {1, used}
"""

# Redis errors that mean "use the database for this call". OSError covers the builtin
# ConnectionError/TimeoutError that asyncio can raise below redis-py's own wrappers.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


class QuotaUnavailable(Exception):
    """Neither Redis nor the database could count this call: the caller must refuse it (503),
    never let it through uncounted."""


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The outcome of one quota check, with what a 429 response or a usage badge needs."""

    allowed: bool
    limit: int | None  # None = uncapped
    used: int  # after this call if allowed; current usage if refused (or peeked)
    remaining: int | None  # None when uncapped
    reset_at: datetime  # next 00:00 UTC (aware, UTC)
    backend: str  # "redis" or "database": which store counted this call

    @property
    def retry_after(self) -> int:
        """Whole seconds from now until ``reset_at`` (at least 1): a Retry-After header value."""
        return max(1, math.ceil((self.reset_at - datetime.now(UTC)).total_seconds()))


def _utc(now: datetime | None) -> datetime:
    """``now`` as an aware UTC datetime; a naive value is taken to be UTC already."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def next_reset(now: datetime | None = None) -> datetime:
    """The next 00:00 UTC after ``now`` (default: the current time): when daily counters reset."""
    return datetime.combine(_utc(now).date() + timedelta(days=1), dt_time.min, tzinfo=UTC)


def quota_key(user_id: int, day: date) -> str:
    """The Redis key of one user's counter for one UTC day."""
    return f"{KEY_PREFIX}:{int(user_id)}:{day.isoformat()}"


def _ttl_seconds(now: datetime) -> int:
    # A relative expiry (EXPIRE, not EXPIREAT) computed from our clock: immune to skew between
    # this host's clock and Redis's.
    return math.ceil((next_reset(now) - now).total_seconds()) + EXPIRY_GRACE_SECONDS


def _check_arguments(limit: int | None, amount: int = 1) -> None:
    if amount < 1:
        raise ValueError(f"amount must be at least 1, not {amount!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None (uncapped) or at least 0, not {limit!r}")


def _decision(*, allowed: bool, limit: int | None, used: int, now: datetime, backend: str) -> QuotaDecision:
    remaining = None if limit is None else max(limit - used, 0)
    return QuotaDecision(allowed, limit, used, remaining, next_reset(now), backend)


def _peek_decision(limit: int | None, used: int, now: datetime, backend: str) -> QuotaDecision:
    return _decision(allowed=limit is None or used < limit, limit=limit, used=used, now=now, backend=backend)


# Whether this process currently counts in the database because Redis failed. Process-wide, like
# the gauge it mirrors; only flips take the lock, the hot path just reads it.
_fallback_lock = threading.Lock()
_fallback_active = False


def _set_fallback_active(active: bool) -> bool:
    """Record a switch to (or back from) the database fallback; True if the state changed."""
    global _fallback_active
    with _fallback_lock:
        if _fallback_active == active:
            return False
        _fallback_active = active
        FALLBACK_ACTIVE.set(1 if active else 0)
    return True


def _run_in_worker(fn: Any, *args: Any) -> QuotaDecision:
    """Run a database step on a limiter worker thread. Those threads live outside Django's request
    cycle, so they retire broken or over-age connections themselves, as a request would."""
    try:
        close_old_connections()
        try:
            return fn(*args)
        finally:
            close_old_connections()
    except DatabaseError as exc:
        raise QuotaUnavailable("the quota database is unavailable") from exc


def _queue_pending(pipe: Any, pending: dict[tuple[int, date], int], now: datetime) -> None:
    """Queue, for each user counted in the database during an outage, the uses to add to Redis."""
    ttl = _ttl_seconds(now)
    for (user_id, day), amount in pending.items():
        pipe.incrby(quota_key(user_id, day), amount)
        pipe.expire(quota_key(user_id, day), ttl)


class UsageLimiter:
    """Daily per-user quota counters in Redis, with the database as fallback (or sole store).

    ``redis_url`` defaults to ``settings.REDIS_URL``; an empty URL (``""``, or no REDIS_URL in
    settings) counts in the database only. After a Redis failure the limiter goes straight to the
    database for ``redis_retry_interval`` seconds, so a blackholed Redis costs one socket timeout
    per interval instead of one per call. The async database path runs on a private pool of
    ``db_workers`` threads, which bounds the database connections it holds.
    """

    def __init__(self, redis_url: str | None = None, *, redis_retry_interval: float = 1.0, db_workers: int = 8) -> None:
        if redis_url is None:
            redis_url = getattr(settings, "REDIS_URL", "")
        self.redis_url: str = redis_url or ""
        self.redis_retry_interval = redis_retry_interval
        self.db_workers = db_workers
        self._lock = threading.Lock()
        self._sync_redis: tuple[redis.Redis, Any] | None = None
        # redis.asyncio clients belong to the event loop that created them: one per running loop.
        self._async_redis: dict[int, tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis, Any]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._skip_redis_until = 0.0
        self._last_warning = -math.inf
        self._suppressed_warnings = 0
        # Uses counted in the database while Redis was down, added to Redis once it answers again.
        self._pending: dict[tuple[int, date], int] = {}

    def __repr__(self) -> str:
        return f"<UsageLimiter backend={REDIS if self.redis_url else DATABASE}>"

    # -- public API -------------------------------------------------------------------------------

    async def aconsume(
        self, user_id: int, limit: int | None, amount: int = 1, *, now: datetime | None = None
    ) -> QuotaDecision:
        """Count ``amount`` uses for today unless that would pass ``limit`` (None: never refuse)."""
        _check_arguments(limit, amount)
        now = _utc(now)
        if self.redis_url:
            if self._redis_usable():
                try:
                    client, script = self._async_client()
                    ok, used = await script(
                        keys=[quota_key(user_id, now.date())],
                        args=[amount, -1 if limit is None else limit, _ttl_seconds(now)],
                        client=client,
                    )
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                else:
                    if _fallback_active or self._pending:
                        await self._arecovered(client, now)
                    return _decision(allowed=bool(ok), limit=limit, used=int(used), now=now, backend=REDIS)
            self._count_fallback()
        decision = await self._in_db_worker(self._db_consume, user_id, limit, amount, now)
        self._remember_fallback_use(user_id, amount, now, decision)
        return decision

    def consume(
        self, user_id: int, limit: int | None, amount: int = 1, *, now: datetime | None = None
    ) -> QuotaDecision:
        """Synchronous ``aconsume`` (management commands, sync views, tests)."""
        _check_arguments(limit, amount)
        now = _utc(now)
        if self.redis_url:
            if self._redis_usable():
                try:
                    client, script = self._sync_client()
                    ok, used = script(
                        keys=[quota_key(user_id, now.date())],
                        args=[amount, -1 if limit is None else limit, _ttl_seconds(now)],
                        client=client,
                    )
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                else:
                    if _fallback_active or self._pending:
                        self._recovered(client, now)
                    return _decision(allowed=bool(ok), limit=limit, used=int(used), now=now, backend=REDIS)
            self._count_fallback()
        decision = self._in_caller_thread(self._db_consume, user_id, limit, amount, now)
        self._remember_fallback_use(user_id, amount, now, decision)
        return decision

    async def arefund(self, user_id: int, amount: int, *, backend: str, now: datetime | None = None) -> None:
        """Give back uses the upstream provably never served (it refused or was unreachable),
        on the backend that counted them. Best effort: a failure leaves the use counted."""
        now = _utc(now)
        if backend == REDIS and self.redis_url:
            try:
                client, _ = self._async_client()
                await client.eval(REFUND_SCRIPT, 1, quota_key(user_id, now.date()), amount)
            except _REDIS_ERRORS as exc:
                logger.warning("could not refund %s use(s) of user %s: %s", amount, user_id, exc)
            return
        try:
            await sync_to_async(self._db_refund, thread_sensitive=False, executor=self._db_executor())(
                user_id, amount, now)
        except DatabaseError as exc:
            logger.warning("could not refund %s use(s) of user %s: %s", amount, user_id, exc)

    @staticmethod
    def _db_refund(user_id: int, amount: int, now: datetime) -> None:
        from usage.models import QuotaCounter

        QuotaCounter.objects.filter(user_id=user_id, day=now.date(), used__gte=amount).update(
            used=F("used") - amount, updated_at=now)

    async def apeek(self, user_id: int, limit: int | None, *, now: datetime | None = None) -> QuotaDecision:
        """Today's usage without counting anything; ``allowed`` says whether one more use would pass."""
        _check_arguments(limit)
        now = _utc(now)
        if self.redis_url:
            if self._redis_usable():
                try:
                    client, _ = self._async_client()
                    raw = await client.get(quota_key(user_id, now.date()))
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                else:
                    if _fallback_active or self._pending:
                        await self._arecovered(client, now)
                    return _peek_decision(limit, int(raw or 0), now, REDIS)
            self._count_fallback()
        return await self._in_db_worker(self._db_peek, user_id, limit, now)

    def peek(self, user_id: int, limit: int | None, *, now: datetime | None = None) -> QuotaDecision:
        """Synchronous ``apeek``."""
        _check_arguments(limit)
        now = _utc(now)
        if self.redis_url:
            if self._redis_usable():
                try:
                    client, _ = self._sync_client()
                    raw = client.get(quota_key(user_id, now.date()))
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                else:
                    if _fallback_active or self._pending:
                        self._recovered(client, now)
                    return _peek_decision(limit, int(raw or 0), now, REDIS)
            self._count_fallback()
        return self._in_caller_thread(self._db_peek, user_id, limit, now)

    async def aclose(self) -> None:
        """Close the Redis client of the running event loop (its connections belong to that loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._async_redis.pop(id(loop), None)
        if entry is not None:
            await entry[1].aclose()

    def close(self) -> None:
        """Close the sync Redis client and the database worker threads with their connections."""
        with self._lock:
            sync_redis, self._sync_redis = self._sync_redis, None
            executor, self._executor = self._executor, None
        if sync_redis is not None:
            sync_redis[0].close()
        if executor is not None:
            # Each worker thread holds its own Django connections: make every worker close them (the
            # barrier puts one job on each thread), then let the threads go.
            barrier = threading.Barrier(self.db_workers)

            def close_thread_connections() -> None:
                try:
                    barrier.wait(timeout=5)
                finally:
                    connections.close_all()

            for _ in range(self.db_workers):
                executor.submit(close_thread_connections)
            executor.shutdown(wait=True)

    # -- Redis clients ----------------------------------------------------------------------------

    def _sync_client(self) -> tuple[redis.Redis, Any]:
        pair = self._sync_redis
        if pair is None:
            with self._lock:
                if self._sync_redis is None:
                    client = redis.Redis.from_url(
                        self.redis_url,
                        socket_timeout=REDIS_SOCKET_TIMEOUT,
                        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
                        # One immediate retry, on connection errors only, so a pooled socket that went
                        # stale (Redis restarted) does not send a call to the database; never on
                        # timeouts, where the script may already have counted.
                        retry=redis.retry.Retry(NoBackoff(), 1, (RedisConnectionError,)),
                    )
                    # register_script hashes locally and calls EVALSHA; on NOSCRIPT (a restarted or
                    # flushed Redis) it loads the script and retries.
                    self._sync_redis = (client, client.register_script(CONSUME_SCRIPT))
                pair = self._sync_redis
        return pair

    def _async_client(self) -> tuple[redis.asyncio.Redis, Any]:
        loop = asyncio.get_running_loop()
        entry = self._async_redis.get(id(loop))
        if entry is None or entry[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self.redis_url,
                socket_timeout=REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
                retry=redis.asyncio.retry.Retry(NoBackoff(), 1, (RedisConnectionError,)),
            )
            entry = (loop, client, client.register_script(CONSUME_SCRIPT))
            with self._lock:
                # Forget the clients of closed loops (their connections died with the loop).
                for key in [key for key, (other, _, _) in self._async_redis.items() if other.is_closed()]:
                    del self._async_redis[key]
                self._async_redis[id(loop)] = entry
        return entry[1], entry[2]

    # -- fallback bookkeeping ---------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return not self._skip_redis_until or time.monotonic() >= self._skip_redis_until

    def _redis_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.redis_retry_interval > 0:
            self._skip_redis_until = now + self.redis_retry_interval
        with self._lock:
            if now - self._last_warning < WARNING_INTERVAL_SECONDS:
                self._suppressed_warnings += 1
                return
            suppressed, self._suppressed_warnings, self._last_warning = self._suppressed_warnings, 0, now
        logger.warning(
            "Redis unavailable for quota counters (%s: %s); counting in the database%s",
            type(exc).__name__,
            exc,
            f" ({suppressed} similar failures not logged)" if suppressed else "",
        )

    def _count_fallback(self) -> None:
        FALLBACK_TOTAL.inc()
        _set_fallback_active(True)

    def _remember_fallback_use(self, user_id: int, amount: int, now: datetime, decision: QuotaDecision) -> None:
        if self.redis_url and decision.allowed:
            key = (int(user_id), now.date())
            with self._lock:
                self._pending[key] = self._pending.get(key, 0) + amount

    def _take_pending(self, now: datetime) -> dict[tuple[int, date], int]:
        with self._lock:
            pending, self._pending = self._pending, {}
        today = now.date()  # uses counted on earlier days no longer matter
        return {key: amount for key, amount in pending.items() if key[1] == today}

    def _restore_pending(self, pending: dict[tuple[int, date], int], exc: BaseException) -> None:
        with self._lock:
            for key, amount in pending.items():
                self._pending[key] = self._pending.get(key, 0) + amount
        logger.warning("Could not add %d fallback counters to Redis yet (%s)", len(pending), exc)

    def _note_recovery(self) -> None:
        self._skip_redis_until = 0.0
        if _set_fallback_active(False):
            logger.info("Redis answers again: quota counters are back on Redis")

    async def _arecovered(self, client: redis.asyncio.Redis, now: datetime) -> None:
        self._note_recovery()
        pending = self._take_pending(now)
        if pending:
            try:
                async with client.pipeline(transaction=False) as pipe:
                    _queue_pending(pipe, pending, now)
                    results = await pipe.execute(raise_on_error=False)
            except _REDIS_ERRORS as exc:
                self._restore_pending(pending, exc)
            else:
                self._report_rejected(pending, results)

    def _recovered(self, client: redis.Redis, now: datetime) -> None:
        self._note_recovery()
        pending = self._take_pending(now)
        if pending:
            try:
                with client.pipeline(transaction=False) as pipe:
                    _queue_pending(pipe, pending, now)
                    results = pipe.execute(raise_on_error=False)
            except _REDIS_ERRORS as exc:
                self._restore_pending(pending, exc)
            else:
                self._report_rejected(pending, results)

    @staticmethod
    def _report_rejected(pending: dict[tuple[int, date], int], results: list[Any]) -> None:
        # Two replies per counter (INCRBY, EXPIRE). A command Redis rejected (say, a key that does not
        # hold an integer) would be rejected again: log it and drop it rather than retry on every call.
        replies = zip(pending, results[::2], strict=True)
        rejected = [(key, reply) for key, reply in replies if isinstance(reply, Exception)]
        if rejected:
            (user_id, day), reply = rejected[0]
            logger.warning(
                "Redis rejected %d fallback counters (first: user %s on %s: %s); those uses stay in the database only",
                len(rejected),
                user_id,
                day,
                reply,
            )

    # -- database backend -------------------------------------------------------------------------

    def _db_executor(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=self.db_workers, thread_name_prefix="quota-db")
                executor = self._executor
        return executor

    async def _in_db_worker(self, fn: Any, *args: Any) -> QuotaDecision:
        return await sync_to_async(_run_in_worker, thread_sensitive=False, executor=self._db_executor())(fn, *args)

    @staticmethod
    def _in_caller_thread(fn: Any, *args: Any) -> QuotaDecision:
        try:
            return fn(*args)
        except DatabaseError as exc:
            raise QuotaUnavailable("the quota database is unavailable") from exc

    @staticmethod
    def _db_consume(user_id: int, limit: int | None, amount: int, now: datetime) -> QuotaDecision:
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
        return _decision(allowed=allowed, limit=limit, used=used, now=now, backend=DATABASE)

    @staticmethod
    def _db_peek(user_id: int, limit: int | None, now: datetime) -> QuotaDecision:
        from usage.models import QuotaCounter

        used = QuotaCounter.objects.filter(user_id=user_id, day=now.date()).values_list("used", flat=True).first()
        return _peek_decision(limit, used or 0, now, DATABASE)


_limiter: UsageLimiter | None = None
_limiter_lock = threading.Lock()


def get_limiter() -> UsageLimiter:
    """The process-wide limiter, built from settings; rebuilt when ``settings.REDIS_URL`` changes
    (tests switch it with ``override_settings``)."""
    global _limiter
    url = getattr(settings, "REDIS_URL", "") or ""
    limiter = _limiter
    if limiter is None or limiter.redis_url != url:
        with _limiter_lock:
            limiter = _limiter
            if limiter is None or limiter.redis_url != url:
                limiter = _limiter = UsageLimiter(url)
    return limiter
