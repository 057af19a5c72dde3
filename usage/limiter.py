"""The daily quota on proxied MCP calls: at most N counted uses per user and UTC day, strictly.

A free-plan user gets ``settings.EXTERNAL_MCP_FREE_DAILY_LIMIT`` uses per UTC day across all
servers and workspaces; a pro-plan user is uncapped but still counted, so usage stays visible.

One source of truth, one fast path:

* The truth is durable: the usage events committed with ``counted=True`` (``usage.models.UsageEvent``).
  Every admitted call's event is committed before its answer ends, and a refunded call's event
  says ``counted=False``.
* Redis is the fast path: one EVALSHA per call. The script admits or refuses against the user's
  counter for the day and writes the decision under a ticket, so a call whose reply was lost (a
  timeout on a script Redis still ran, a dropped connection) asks again with the same ticket and
  gets the same decision instead of being counted twice or sent elsewhere.
* A counter Redis does not have (first call of the day, or Redis restarted empty) is seeded from
  the truth before anything is admitted. A Redis that lost its counters is recognised by a missing
  epoch marker; calls admitted before it forgot them may still be running and not yet committed,
  so capped plans are refused (503 + Retry-After) until they have all settled: the proxy timeout
  plus ``SETTLE_SECONDS``.
* Redis unreachable or silent past ``EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS``: capped plans get 503 +
  Retry-After (``QuotaUnavailable``); uncapped plans go on, uncounted in Redis (their events still
  count them). Nothing is ever admitted on a count that does not know what Redis admitted.

Without Redis (the embedded SQLite demo) the counters live in ``usage.models.QuotaCounter`` and a
conditional UPDATE is the truth and the guarantee. docs/architecture.md ("The daily quota") has the
policy, its cost and the Redis persistence production needs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections, connection, connections
from prometheus_client import Counter, Gauge
from redis.exceptions import TimeoutError as RedisTimeoutError

from twinmcp.ids import random_hex
from usage.quota import (
    DATABASE,
    REDIS,
    UNCOUNTED,
    QuotaDecision,
    QuotaUnavailable,
    make_decision,
    next_reset,
    peek_decision,
    settle_seconds,
    utc,
)
from usage.quota_db import (
    committed_uses,
    committed_uses_many,
    db_consume,
    db_peek,
    db_peek_many,
    db_refund,
    epoch_start,
)
from usage.quota_redis import (
    EPOCH_KEY,
    EXPIRY_GRACE_SECONDS,
    NEEDS_SEED,
    NO_EPOCH,
    REDIS_ERRORS,
    SETTLING,
    RedisDown,
    quota_key,
    ticket_key,
)
from usage.quota_redis import register as register_scripts

logger = logging.getLogger(__name__)

T = TypeVar("T")


# One attempt's socket timeout; a slow Redis gets more attempts until EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS.
REDIS_SOCKET_TIMEOUT = 0.5
# After Redis failed, calls skip it (capped: 503 at once) for this long instead of each waiting.
REDIS_RETRY_INTERVAL = 1.0
# At most one "Redis is down" warning per this many seconds (per limiter, i.e. per process).
WARNING_INTERVAL_SECONDS = 60.0

UNAVAILABLE_TOTAL = Counter(
    "external_mcp_quota_unavailable",  # exposed as external_mcp_quota_unavailable_total
    "Capped calls refused with 503 because the quota could not be decided (Redis unreachable, or a reset settling).",
)
UNAVAILABLE_ACTIVE = Gauge(
    "external_mcp_quota_unavailable_active",
    "1 while this process cannot decide capped quotas (Redis unreachable or a reset settling), 0 otherwise.",
    multiprocess_mode="livemax",
)


def _ttl_seconds(now: datetime) -> int:
    # A relative expiry (EXPIRE, not EXPIREAT) computed from our clock: immune to skew between
    # this host's clock and Redis's.
    return math.ceil((next_reset(now) - now).total_seconds()) + EXPIRY_GRACE_SECONDS


def _ticket_ttl() -> int:
    """A ticket must outlive its call, so that the call's refund still finds it."""
    return settle_seconds() + 60


def _check_arguments(limit: int | None, amount: int = 1) -> None:
    if amount < 1:
        raise ValueError(f"amount must be at least 1, not {amount!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None (uncapped) or at least 0, not {limit!r}")


# Whether this process currently cannot decide capped quotas. Process-wide, like the gauge it
# mirrors; only flips take the lock.
_unavailable_lock = threading.Lock()
_unavailable = False


def _set_unavailable(active: bool) -> bool:
    global _unavailable
    with _unavailable_lock:
        if _unavailable == active:
            return False
        _unavailable = active
        UNAVAILABLE_ACTIVE.set(1 if active else 0)
    return True


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True, slots=True)
class _Get:
    key: str


@dataclass(frozen=True, slots=True)
class _MGet:
    keys: list[str]


@dataclass(frozen=True, slots=True)
class _Db:
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Epoch:
    now: datetime


_Step = _Script | _Get | _MGet | _Db | _Epoch
# A quota operation written once as the steps it needs; ``UsageLimiter`` runs it with the async
# clients on the proxy's event loop, or with the sync ones in the caller's thread.
Flow = Generator[_Step, Any, T]


def _consume_flow(user_id: int, limit: int | None, amount: int, now: datetime) -> Flow[QuotaDecision]:
    ticket = random_hex()
    keys = [quota_key(user_id, now.date()), EPOCH_KEY, ticket_key(ticket)]
    seed = ""
    for _ in range(4):
        code, value = yield _Script("consume", keys, [amount, -1 if limit is None else limit, _ttl_seconds(now),
                                                       seed, _ticket_ttl()])
        if code == NO_EPOCH:
            yield _Epoch(now)
        elif code == NEEDS_SEED:
            seed = str((yield _Db(committed_uses, (user_id, now.date()))))
        elif code == SETTLING:
            raise QuotaUnavailable("the quota counters are settling after a Redis reset",
                                   retry_after=math.ceil(int(value) / 1000))
        else:
            return make_decision(allowed=bool(code), limit=limit, used=int(value), now=now, backend=REDIS,
                                 ticket=ticket)
    raise QuotaUnavailable("the quota counter could not be initialised")


def _peek_flow(user_id: int, limit: int | None, now: datetime) -> Flow[QuotaDecision]:
    """Without a Redis counter (Redis down, or no call yet today) the committed events say how
    many uses are charged."""
    try:
        raw = yield _Get(quota_key(user_id, now.date()))
    except RedisDown:
        raw = None
    if raw is None:
        return peek_decision(limit, (yield _Db(committed_uses, (user_id, now.date()))), now, DATABASE)
    return peek_decision(limit, int(raw), now, REDIS)


def _peek_many_flow(limits: Mapping[int, int | None], now: datetime) -> Flow[dict[int, QuotaDecision]]:
    """``_peek_flow`` for many users in two round trips at most: one MGET, then one query for the
    users Redis has no counter for."""
    users = list(limits)
    try:
        raw = yield _MGet([quota_key(user_id, now.date()) for user_id in users])
    except RedisDown:
        raw = [None] * len(users)
    counters = {user_id: int(value) for user_id, value in zip(users, raw, strict=True) if value is not None}
    missing = [user_id for user_id in users if user_id not in counters]
    committed = (yield _Db(committed_uses_many, (missing, now.date()))) if missing else {}
    return {
        user_id: peek_decision(limits[user_id], counters[user_id], now, REDIS) if user_id in counters
        else peek_decision(limits[user_id], committed.get(user_id, 0), now, DATABASE)
        for user_id in users
    }


def _refund_flow(user_id: int, refunded_total: int, ticket: str, day: date) -> Flow[None]:
    yield _Script("refund", [quota_key(user_id, day), ticket_key(ticket)], [refunded_total])


class UsageLimiter:
    """Daily per-user quota counters: Redis as the fast path over the committed events, or the
    database alone when no Redis is configured.

    ``redis_url`` defaults to ``settings.REDIS_URL``; an empty URL counts in the database only.
    Database work of the async path runs on a private pool of ``db_workers`` threads, which bounds
    the connections it holds.
    """

    def __init__(self, redis_url: str | None = None, *, redis_retry_interval: float = REDIS_RETRY_INTERVAL,
                 db_workers: int = 8) -> None:
        if redis_url is None:
            redis_url = getattr(settings, "REDIS_URL", "")
        self.redis_url: str = redis_url or ""
        self.redis_retry_interval = redis_retry_interval
        self.db_workers = db_workers
        self._lock = threading.Lock()
        self._sync_redis: tuple[redis.Redis, dict[str, Any]] | None = None
        # redis.asyncio clients belong to the event loop that created them: one per running loop.
        self._async_redis: dict[int, tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis, dict[str, Any]]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._skip_redis_until = 0.0
        self._last_warning = -math.inf
        self._suppressed_warnings = 0

    def __repr__(self) -> str:
        return f"<UsageLimiter backend={REDIS if self.redis_url else DATABASE}>"

    # -- public API -------------------------------------------------------------------------------

    async def aconsume(
        self, user_id: int, limit: int | None, amount: int = 1, *, now: datetime | None = None
    ) -> QuotaDecision:
        """Count ``amount`` uses for today unless that would pass ``limit`` (None: never refuse).
        Raises ``QuotaUnavailable`` when a capped call cannot be decided."""
        _check_arguments(limit, amount)
        now = utc(now)
        if not self.redis_url:
            return await self._in_db_worker(db_consume, user_id, limit, amount, now)
        try:
            return self._decided(await self._arun(_consume_flow(user_id, limit, amount, now)))
        except (RedisDown, QuotaUnavailable) as exc:
            return self._undecided(limit, now, exc)

    def consume(
        self, user_id: int, limit: int | None, amount: int = 1, *, now: datetime | None = None
    ) -> QuotaDecision:
        """Synchronous ``aconsume`` (management commands, sync views, tests)."""
        _check_arguments(limit, amount)
        now = utc(now)
        if not self.redis_url:
            return _db_call(db_consume, user_id, limit, amount, now)
        try:
            return self._decided(self._run(_consume_flow(user_id, limit, amount, now)))
        except (RedisDown, QuotaUnavailable) as exc:
            return self._undecided(limit, now, exc)

    async def arefund(self, user_id: int, decision: QuotaDecision, amount: int, *,
                      refunded_total: int | None = None) -> None:
        """Give back ``amount`` uses of an admitted call that were not served (their events say
        ``counted=False``), on the store and the day's counter that counted them. On Redis the
        call's ticket keeps ``refunded_total`` — all of this call's uses given back so far,
        ``amount`` by default — so a refund asked twice gives back once. Best effort: a failure
        leaves the uses counted in Redis, which can only refuse more, never admit more."""
        try:
            if decision.backend == REDIS and self.redis_url and decision.ticket:
                await self._arun(_refund_flow(user_id, refunded_total or amount, decision.ticket, decision.day))
            elif decision.backend == DATABASE:
                await self._in_db_worker(db_refund, user_id, amount, decision.day)
        except (RedisDown, QuotaUnavailable) as exc:
            logger.warning("could not refund %s use(s) of user %s: %s", amount, user_id, exc)

    async def apeek(self, user_id: int, limit: int | None, *, now: datetime | None = None) -> QuotaDecision:
        """Today's usage without counting anything; ``allowed`` says whether one more use would pass."""
        _check_arguments(limit)
        now = utc(now)
        if not self.redis_url:
            return await self._in_db_worker(db_peek, user_id, limit, now)
        return await self._arun(_peek_flow(user_id, limit, now))

    def peek(self, user_id: int, limit: int | None, *, now: datetime | None = None) -> QuotaDecision:
        """Synchronous ``apeek``."""
        _check_arguments(limit)
        now = utc(now)
        if not self.redis_url:
            return _db_call(db_peek, user_id, limit, now)
        return self._run(_peek_flow(user_id, limit, now))

    def peek_many(self, limits: Mapping[int, int | None], *,
                  now: datetime | None = None) -> dict[int, QuotaDecision]:
        """``peek`` for every user in ``limits`` (user id → daily limit) at a constant cost: a list
        page of quotas must not ask the store once per row."""
        for limit in limits.values():
            _check_arguments(limit)
        now = utc(now)
        if not limits:
            return {}
        if not self.redis_url:
            return _db_call(db_peek_many, limits, now)
        return self._run(_peek_many_flow(limits, now))

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

    # -- running flows ----------------------------------------------------------------------------

    def _undecided(self, limit: int | None, now: datetime, exc: Exception) -> QuotaDecision:
        """No decision could be made: an uncapped call goes on (its event still counts it), a
        capped one is refused."""
        if limit is None:
            return make_decision(allowed=True, limit=None, used=0, now=now, backend=UNCOUNTED)
        UNAVAILABLE_TOTAL.inc()
        _set_unavailable(True)
        if isinstance(exc, QuotaUnavailable):
            raise exc
        raise QuotaUnavailable("the quota store (Redis) is unavailable",
                               retry_after=math.ceil(self.redis_retry_interval)) from exc

    async def _arun(self, flow: Flow[T]) -> T:
        client, scripts = self._async_client()
        reply: Any = None
        failure: RedisDown | None = None
        while True:
            try:
                step = flow.throw(failure) if failure is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, failure = None, None
            if isinstance(step, _Db):
                reply = await self._in_db_worker(step.fn, *step.args)
                continue
            if isinstance(step, _Epoch):
                sync_client, sync_scripts = self._sync_client()
                await self._in_db_worker(epoch_start, sync_client, sync_scripts["epoch"], step.now)
                continue
            if not self._redis_usable():
                failure = RedisDown()
                continue
            retry = _Retry()
            while True:
                try:
                    reply = await (client.get(step.key) if isinstance(step, _Get)
                                   else client.mget(step.keys) if isinstance(step, _MGet)
                                   else scripts[step.name](keys=step.keys, args=step.args, client=client))
                except REDIS_ERRORS as exc:
                    pause = retry.after(exc)
                    if pause is None:
                        failure = self._redis_failed(exc)
                        break
                    await asyncio.sleep(pause)
                else:
                    self._redis_answered()
                    break

    def _run(self, flow: Flow[T]) -> T:
        """Synchronous ``_arun``: database steps run in the caller's thread (and transaction)."""
        client, scripts = self._sync_client()
        reply: Any = None
        failure: RedisDown | None = None
        while True:
            try:
                step = flow.throw(failure) if failure is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, failure = None, None
            if isinstance(step, _Db):
                reply = _db_call(step.fn, *step.args)
                continue
            if isinstance(step, _Epoch):
                _db_call(epoch_start, client, scripts["epoch"], step.now)
                continue
            if not self._redis_usable():
                failure = RedisDown()
                continue
            retry = _Retry()
            while True:
                try:
                    reply = (client.get(step.key) if isinstance(step, _Get)
                             else client.mget(step.keys) if isinstance(step, _MGet)
                             else scripts[step.name](keys=step.keys, args=step.args, client=client))
                except REDIS_ERRORS as exc:
                    pause = retry.after(exc)
                    if pause is None:
                        failure = self._redis_failed(exc)
                        break
                    time.sleep(pause)
                else:
                    self._redis_answered()
                    break

    def _sync_client(self) -> tuple[redis.Redis, dict[str, Any]]:
        pair = self._sync_redis
        if pair is None:
            with self._lock:
                if self._sync_redis is None:
                    client = redis.Redis.from_url(self.redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT,
                                                  socket_connect_timeout=REDIS_SOCKET_TIMEOUT, retry=None)
                    self._sync_redis = (client, register_scripts(client))
                pair = self._sync_redis
        return pair

    def _async_client(self) -> tuple[redis.asyncio.Redis, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        entry = self._async_redis.get(id(loop))
        if entry is None or entry[0] is not loop:
            client = redis.asyncio.Redis.from_url(self.redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT,
                                                  socket_connect_timeout=REDIS_SOCKET_TIMEOUT, retry=None)
            entry = (loop, client, register_scripts(client))
            with self._lock:
                # Forget the clients of closed loops (their connections died with the loop).
                for key in [key for key, (other, _, _) in self._async_redis.items() if other.is_closed()]:
                    del self._async_redis[key]
                self._async_redis[id(loop)] = entry
        return entry[1], entry[2]

    # -- Redis health -----------------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return not self._skip_redis_until or time.monotonic() >= self._skip_redis_until

    def _redis_failed(self, exc: BaseException) -> RedisDown:
        now = time.monotonic()
        if self.redis_retry_interval > 0:
            self._skip_redis_until = now + self.redis_retry_interval
        _set_unavailable(True)
        with self._lock:
            if now - self._last_warning < WARNING_INTERVAL_SECONDS:
                self._suppressed_warnings += 1
                return RedisDown()
            suppressed, self._suppressed_warnings, self._last_warning = self._suppressed_warnings, 0, now
        logger.warning(
            "Redis unavailable for quota counters (%s: %s); capped plans get 503 until it answers%s",
            type(exc).__name__, exc, f" ({suppressed} similar failures not logged)" if suppressed else "",
        )
        return RedisDown()

    def _redis_answered(self) -> None:
        if self._skip_redis_until:
            self._skip_redis_until = 0.0

    @staticmethod
    def _decided(decision: QuotaDecision) -> QuotaDecision:
        if _unavailable and _set_unavailable(False):
            logger.info("Quotas can be decided again")
        return decision

    # -- database ---------------------------------------------------------------------------------

    def _db_executor(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=self.db_workers, thread_name_prefix="quota-db")
                executor = self._executor
        return executor

    async def _in_db_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await sync_to_async(_run_in_worker, thread_sensitive=False, executor=self._db_executor())(fn, *args)


class _Retry:
    """When to ask Redis again. Every command here is idempotent (the scripts by their ticket), so
    a timeout — which may hide a reply Redis did send — is asked again with backoff until
    ``EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS``; a broken connection once at once (a pooled socket that
    went stale when Redis restarted), then Redis counts as down."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + settings.EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS / 1000
        self.delay = 0.01
        self.broken = 0

    def after(self, exc: BaseException) -> float | None:
        """The pause before the next attempt, or None to give up."""
        if isinstance(exc, RedisTimeoutError | TimeoutError):
            pause, self.delay = self.delay, min(self.delay * 2, 0.2)
            return pause if time.monotonic() + pause < self.deadline else None
        self.broken += 1
        return 0.0 if self.broken == 1 else None


def _db_call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except DatabaseError as exc:
        raise QuotaUnavailable("the quota database is unavailable") from exc


def _run_in_worker(fn: Callable[..., T], *args: Any) -> T:
    """A database step on a limiter worker thread. Those threads live outside Django's request
    cycle, so they retire broken or over-age connections themselves, as a request would — and,
    since their steps are rare (a counter's seed once per user and day, an epoch), check that a
    kept connection still answers first: one that died while the thread idled (PostgreSQL
    restarted, the connection killed) must not turn into a refused call."""
    try:
        close_old_connections()
        if connection.connection is not None and not connection.is_usable():
            connection.close()
        return _db_call(fn, *args)
    finally:
        close_old_connections()


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
