"""The daily quota limiter, on real Redis and real PostgreSQL.

Redis outages are real too: a private ``redis-server`` is started on a free port and stopped
mid-test, or the limiter is pointed at a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import threading
import time
from datetime import UTC, date, datetime, timedelta, timezone

import psycopg
import pytest
import redis
import time_machine
from django.db import OperationalError, connection, transaction
from django.db.models import QuerySet
from django.test import override_settings
from prometheus_client import REGISTRY

from twinmcp import services
from usage import limiter as limiter_module
from usage.limiter import (
    EXPIRY_GRACE_SECONDS,
    QuotaDecision,
    QuotaUnavailable,
    UsageLimiter,
    get_limiter,
    next_reset,
    quota_key,
)
from usage.models import QuotaCounter

LIMIT = 200


# -- helpers and fixtures --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fallback_total() -> float:
    return REGISTRY.get_sample_value("external_mcp_quota_fallback_total") or 0.0


def fallback_active() -> float | None:
    return REGISTRY.get_sample_value("external_mcp_quota_fallback_active")


def wipe_quota_keys(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match="twinmcp:quota:*", count=1000))
    if keys:
        client.delete(*keys)


class RedisServer:
    """A private redis-server this test starts and stops (by its own pid), always on one port."""

    def __init__(self, directory) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            for _ in range(100):
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def skip_on_in_memory_sqlite() -> None:
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip(
            "SQLite's shared-cache in-memory test database fails concurrent writers ('table is locked') "
            "instead of waiting for them; file databases, like the demo's, serialise them"
        )


@pytest.fixture(autouse=True)
def _fallback_state_is_per_test():
    """The fallback gauge and its flag are process-wide: leave them as the next test expects."""
    yield
    limiter_module._set_fallback_active(False)


@pytest.fixture
def spare_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    wipe_quota_keys(client)
    yield client
    wipe_quota_keys(client)
    client.close()


@pytest.fixture
async def make_limiter():
    """Builds limiters and closes them afterwards (the async client of this test's loop included)."""
    made: list[UsageLimiter] = []

    def make(redis_url: str = "", **kwargs) -> UsageLimiter:
        kwargs.setdefault("redis_retry_interval", 0)
        made.append(UsageLimiter(redis_url, **kwargs))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.aclose()
        limiter.close()


@pytest.fixture
def limiter_for(request, make_limiter):
    """A limiter on the named backend: "redis" (the suite's Redis) or "database" (no Redis)."""

    def build(backend: str) -> UsageLimiter:
        if backend == "redis":
            request.getfixturevalue("redis_client")  # wipes quota keys before and after the test
            return make_limiter(request.getfixturevalue("redis_url"))
        return make_limiter("")

    return build


# -- pure helpers ----------------------------------------------------------------------------------


def test_next_reset_is_the_next_utc_midnight():
    assert next_reset(datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC)) == datetime(2031, 3, 15, tzinfo=UTC)
    assert next_reset(datetime(2031, 3, 15, 0, 0, 0, tzinfo=UTC)) == datetime(2031, 3, 16, tzinfo=UTC)
    # An aware non-UTC time counts by its UTC day: 20:00 at UTC-5 is 01:00 UTC the next day.
    eastern = timezone(timedelta(hours=-5))
    assert next_reset(datetime(2031, 12, 31, 20, 0, tzinfo=eastern)) == datetime(2032, 1, 2, tzinfo=UTC)
    # Naive means UTC.
    assert next_reset(datetime(2031, 12, 31, 23, 0)) == datetime(2032, 1, 1, tzinfo=UTC)
    with time_machine.travel(datetime(2031, 6, 1, 12, 0, tzinfo=UTC), tick=False):
        reset = next_reset()
    assert reset == datetime(2031, 6, 2, tzinfo=UTC)
    assert reset.tzinfo is UTC


def test_key_names_user_and_utc_day():
    assert quota_key(42, date(2031, 3, 14)) == "twinmcp:quota:42:2031-03-14"


def test_retry_after_is_whole_seconds_and_at_least_one():
    with time_machine.travel(datetime(2031, 3, 14, 23, 0, 0, 250000, tzinfo=UTC), tick=False):
        decision = QuotaDecision(False, 5, 5, 0, datetime(2031, 3, 15, tzinfo=UTC), "redis")
        assert decision.retry_after == 3600  # 3599.75 s, rounded up
        stale = QuotaDecision(False, 5, 5, 0, datetime(2031, 3, 14, tzinfo=UTC), "redis")
        assert stale.retry_after == 1


def test_arguments_are_checked(make_limiter):
    limiter = make_limiter("")
    with pytest.raises(ValueError, match="amount"):
        limiter.consume(1, LIMIT, amount=0)
    with pytest.raises(ValueError, match="limit"):
        limiter.consume(1, -1)
    with pytest.raises(ValueError, match="limit"):
        limiter.peek(1, -5)


def test_repr_names_the_backend(make_limiter, redis_url):
    assert "database" in repr(make_limiter(""))
    assert "redis" in repr(make_limiter(redis_url))


# -- Redis backend ---------------------------------------------------------------------------------


async def test_redis_counts_and_refuses_past_the_limit(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)
    first = await limiter.aconsume(7001, 3)
    assert first == QuotaDecision(True, 3, 1, 2, next_reset(), "redis")
    assert (await limiter.aconsume(7001, 3, amount=2)).used == 3
    refused = await limiter.aconsume(7001, 3)
    assert (refused.allowed, refused.used, refused.remaining) == (False, 3, 0)
    # A refused call leaves the counter as it was.
    assert int(redis_client.get(quota_key(7001, datetime.now(UTC).date()))) == 3
    # An amount that does not fit is refused whole, even on a fresh counter.
    big = await limiter.aconsume(7002, 3, amount=4)
    assert (big.allowed, big.used, big.remaining) == (False, 0, 3)


async def test_redis_is_exact_under_concurrency(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)
    user_id = 7010
    assert (await limiter.aconsume(user_id, LIMIT, amount=195)).used == 195

    decisions = await asyncio.gather(*(limiter.aconsume(user_id, LIMIT) for _ in range(50)))

    allowed = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(allowed) == 5
    assert sorted(d.used for d in allowed) == [196, 197, 198, 199, 200]
    assert {(d.used, d.remaining) for d in refused} == {(200, 0)}
    assert (await limiter.apeek(user_id, LIMIT)).used == 200
    assert int(redis_client.get(quota_key(user_id, datetime.now(UTC).date()))) == 200


def test_redis_sync_path_matches(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)
    assert limiter.consume(7020, 2).used == 1
    assert limiter.consume(7020, 2).used == 2
    refused = limiter.consume(7020, 2)
    assert (refused.allowed, refused.used, refused.backend) == (False, 2, "redis")
    peeked = limiter.peek(7020, 2)
    assert (peeked.allowed, peeked.used, peeked.remaining) == (False, 2, 0)
    assert limiter.peek(7021, 2) == QuotaDecision(True, 2, 0, 2, next_reset(), "redis")


async def test_peek_does_not_count(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)
    await limiter.aconsume(7030, 5, amount=4)
    for _ in range(3):
        peeked = await limiter.apeek(7030, 5)
        assert (peeked.allowed, peeked.used, peeked.remaining) == (True, 4, 1)
    await limiter.aconsume(7030, 5)
    assert (await limiter.apeek(7030, 5)).allowed is False


def test_redis_keys_expire_after_their_day(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)
    now = datetime.now(UTC)
    limiter.consume(7040, LIMIT, now=now)
    ttl = redis_client.ttl(quota_key(7040, now.date()))
    assert 0 < ttl <= (next_reset(now) - now).total_seconds() + EXPIRY_GRACE_SECONDS + 1

    late = datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC)
    limiter.consume(7040, LIMIT, now=late)
    assert 0 < redis_client.ttl(quota_key(7040, late.date())) <= 1 + EXPIRY_GRACE_SECONDS

    # A refused first call still leaves an expiring key, and a key someone wrote without an
    # expiry gets one on its next use.
    limiter.consume(7041, 0)
    assert redis_client.ttl(quota_key(7041, now.date())) > 0
    redis_client.set(quota_key(7042, now.date()), 195)
    assert limiter.consume(7042, LIMIT, now=now).used == 196
    assert 0 < redis_client.ttl(quota_key(7042, now.date())) <= 86400 + EXPIRY_GRACE_SECONDS


async def test_script_is_reloaded_after_redis_forgets_it(make_limiter, redis_url, redis_client):
    """What a Redis restart does to a registered script (NOSCRIPT), without the restart."""
    limiter = make_limiter(redis_url)
    assert (await limiter.aconsume(7050, LIMIT)).used == 1
    assert limiter.consume(7050, LIMIT).used == 2
    redis_client.script_flush()
    assert (await limiter.aconsume(7050, LIMIT)).used == 3
    redis_client.script_flush()
    assert limiter.consume(7050, LIMIT).used == 4


def test_one_async_client_per_event_loop(make_limiter, redis_url, redis_client):
    limiter = make_limiter(redis_url)

    async def use_and_close_connections() -> int:
        decision = await limiter.aconsume(7060, LIMIT)
        await limiter._async_redis[id(asyncio.get_running_loop())][1].connection_pool.disconnect()
        return decision.used

    # Each asyncio.run is a new loop: the limiter gives it its own client and forgets the closed one.
    assert asyncio.run(use_and_close_connections()) == 1
    assert asyncio.run(use_and_close_connections()) == 2
    assert len(limiter._async_redis) == 1
    limiter._async_redis.clear()


# -- database backend ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_database_counts_and_refuses_past_the_limit(make_limiter, member):
    limiter = make_limiter("")
    user_id = member.user.pk
    assert limiter.peek(user_id, 3) == QuotaDecision(True, 3, 0, 3, next_reset(), "database")
    assert limiter.consume(user_id, 3) == QuotaDecision(True, 3, 1, 2, next_reset(), "database")
    assert limiter.consume(user_id, 3, amount=2).used == 3
    refused = limiter.consume(user_id, 3)
    assert (refused.allowed, refused.used, refused.remaining, refused.backend) == (False, 3, 0, "database")
    assert QuotaCounter.objects.get(user=member.user).used == 3
    assert limiter.peek(user_id, 3).allowed is False
    big = limiter.consume(member.user.pk, 3, amount=4, now=datetime.now(UTC) + timedelta(days=1))
    assert (big.allowed, big.used) == (False, 0)


@pytest.mark.django_db(transaction=True)
def test_database_is_exact_under_thread_concurrency(make_limiter, member):
    skip_on_in_memory_sqlite()
    limiter = make_limiter("")
    user_id = member.user.pk
    assert limiter.consume(user_id, LIMIT, amount=195).used == 195
    tomorrow = datetime.now(UTC) + timedelta(days=1)

    def run_threads(count: int, limit: int, now: datetime | None) -> list[QuotaDecision]:
        barrier = threading.Barrier(count)
        results: list[QuotaDecision] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait(timeout=30)
                results.append(limiter.consume(user_id, limit, now=now))
            except BaseException as exc:
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        assert len(results) == count
        return results

    decisions = run_threads(50, LIMIT, None)
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 5
    assert sorted(d.used for d in allowed) == [196, 197, 198, 199, 200]
    assert {(d.used, d.remaining) for d in decisions if not d.allowed} == {(200, 0)}
    assert QuotaCounter.objects.get(user_id=user_id, day=datetime.now(UTC).date()).used == 200

    # A day's first calls race to create its row: still exact.
    decisions = run_threads(30, 5, tomorrow)
    assert sorted(d.used for d in decisions if d.allowed) == [1, 2, 3, 4, 5]
    assert QuotaCounter.objects.get(user_id=user_id, day=tomorrow.date()).used == 5


@pytest.mark.django_db(transaction=True)
async def test_database_async_path_is_exact_under_concurrency(make_limiter, member):
    skip_on_in_memory_sqlite()
    limiter = make_limiter("", db_workers=8)
    user_id = member.user.pk
    assert (await limiter.aconsume(user_id, LIMIT, amount=195)).used == 195

    decisions = await asyncio.gather(*(limiter.aconsume(user_id, LIMIT) for _ in range(50)))

    assert sorted(d.used for d in decisions if d.allowed) == [196, 197, 198, 199, 200]
    assert {d.backend for d in decisions} == {"database"}
    peeked = await limiter.apeek(user_id, LIMIT)
    assert (peeked.allowed, peeked.used, peeked.backend) == (False, 200, "database")


# -- both backends ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["redis", "database"])
def test_counters_reset_at_midnight_utc(backend, limiter_for, member):
    limiter = limiter_for(backend)
    user_id = member.user.pk
    with time_machine.travel(datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC), tick=False):
        assert limiter.consume(user_id, LIMIT, amount=LIMIT).used == LIMIT
        refused = limiter.consume(user_id, LIMIT)
        assert (refused.allowed, refused.used, refused.remaining, refused.backend) == (False, LIMIT, 0, backend)
        assert refused.reset_at == datetime(2031, 3, 15, tzinfo=UTC)
        assert refused.retry_after == 1
    with time_machine.travel(datetime(2031, 3, 15, 0, 0, 0, tzinfo=UTC), tick=False):
        fresh = limiter.consume(user_id, LIMIT)
        assert (fresh.allowed, fresh.used, fresh.remaining) == (True, 1, LIMIT - 1)
        assert fresh.reset_at == datetime(2031, 3, 16, tzinfo=UTC)
        assert fresh.retry_after == 86400
        # Yesterday's counter is still yesterday's.
        assert limiter.peek(user_id, LIMIT, now=datetime(2031, 3, 14, 12, tzinfo=UTC)).used == LIMIT


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["redis", "database"])
def test_pro_plan_is_never_refused_but_counted(backend, limiter_for, member):
    limiter = limiter_for(backend)
    services.profile_set_plan(user=member.user, code="pro")
    member.user.refresh_from_db()
    limit = member.user.profile.plan.effective_daily_limit
    assert limit is None
    assert limiter.consume(member.user.pk, limit, amount=1000) == QuotaDecision(
        True, None, 1000, None, next_reset(), backend
    )
    assert limiter.consume(member.user.pk, limit).used == 1001
    assert limiter.peek(member.user.pk, limit) == QuotaDecision(True, None, 1001, None, next_reset(), backend)
    # Usage stays visible against a cap, should the user go back to the free plan today.
    assert limiter.peek(member.user.pk, LIMIT).allowed is False


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["redis", "database"])
def test_free_plan_limit_comes_from_settings(backend, limiter_for, member):
    limiter = limiter_for(backend)
    with override_settings(EXTERNAL_MCP_FREE_DAILY_LIMIT=2):
        limit = services.profile_ensure(user=member.user).plan.effective_daily_limit
    assert limit == 2
    assert [limiter.consume(member.user.pk, limit).allowed for _ in range(3)] == [True, True, False]


# -- Redis outages ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_falls_back_to_the_database_while_redis_is_down(make_limiter, spare_redis, member, caplog):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    user_id = member.user.pk
    assert limiter.consume(user_id, LIMIT, amount=10).backend == "redis"
    before = fallback_total()

    spare_redis.stop()
    with caplog.at_level(logging.WARNING, logger="usage.limiter"):
        during = [limiter.consume(user_id, LIMIT), limiter.consume(user_id, LIMIT, amount=2)]
        peeked = limiter.peek(user_id, LIMIT)
    assert [(d.allowed, d.used, d.backend) for d in during] == [(True, 1, "database"), (True, 3, "database")]
    assert (peeked.used, peeked.backend) == (3, "database")
    assert fallback_total() == before + 3
    assert fallback_active() == 1
    # One warning per minute at most, however many calls fall back.
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 1

    spare_redis.start()  # a fresh Redis: without persistence the 10 pre-outage uses are gone
    back = limiter.consume(user_id, LIMIT)
    assert (back.backend, back.used) == ("redis", 1)
    assert fallback_active() == 0
    assert fallback_total() == before + 3
    # The outage's uses were added to Redis once it answered again.
    assert limiter.peek(user_id, LIMIT).used == 1 + 3
    assert QuotaCounter.objects.get(user=member.user).used == 3


@pytest.mark.django_db(transaction=True)
async def test_async_fallback_and_recovery(make_limiter, spare_redis, member):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    user_id = member.user.pk
    assert (await limiter.aconsume(user_id, LIMIT)).backend == "redis"

    spare_redis.stop()
    down = await limiter.aconsume(user_id, LIMIT, amount=4)
    assert (down.allowed, down.used, down.backend) == (True, 4, "database")
    assert (await limiter.apeek(user_id, LIMIT)).backend == "database"
    assert fallback_active() == 1

    spare_redis.start()
    peeked = await limiter.apeek(user_id, LIMIT)  # a peek also brings the counters back to Redis
    assert (peeked.backend, peeked.used) == ("redis", 0)
    assert fallback_active() == 0
    assert (await limiter.apeek(user_id, LIMIT)).used == 4
    assert (await limiter.aconsume(user_id, LIMIT)).used == 5


@pytest.mark.django_db
def test_redis_on_a_closed_port_falls_back(make_limiter, member):
    limiter = make_limiter(f"redis://127.0.0.1:{free_port()}/0")
    decision = limiter.consume(member.user.pk, LIMIT)
    assert (decision.allowed, decision.used, decision.backend) == (True, 1, "database")
    assert fallback_active() == 1


@pytest.mark.django_db
def test_failed_redis_is_skipped_for_a_while(make_limiter, spare_redis, member):
    limiter = make_limiter(spare_redis.url, redis_retry_interval=1.5)
    assert limiter.consume(member.user.pk, LIMIT).backend == "database"
    spare_redis.start()
    # Within the interval the limiter does not even try Redis: no per-call timeout on a sick Redis.
    assert limiter.consume(member.user.pk, LIMIT).backend == "database"
    time.sleep(max(0.0, limiter._skip_redis_until - time.monotonic()) + 0.05)
    assert limiter.consume(member.user.pk, LIMIT).backend == "redis"


@pytest.mark.django_db(transaction=True)
async def test_async_skip_and_rejected_fallback_counters(make_limiter, spare_redis, admin, member, caplog):
    """A counter Redis refuses to increment (not an integer) is logged and dropped, not retried forever."""
    spare_redis.start()
    limiter = make_limiter(spare_redis.url, redis_retry_interval=60)
    spare_redis.stop()
    assert (await limiter.aconsume(admin.user.pk, LIMIT)).backend == "database"
    spare_redis.start()
    assert (await limiter.aconsume(admin.user.pk, LIMIT)).backend == "database"  # still skipping Redis
    assert (await limiter.apeek(admin.user.pk, LIMIT)).backend == "database"
    limiter._skip_redis_until = 0.0  # the interval is over

    spare = redis.Redis(port=spare_redis.port)
    spare.set(quota_key(admin.user.pk, datetime.now(UTC).date()), "not a number")
    with caplog.at_level(logging.WARNING, logger="usage.limiter"):
        assert (await limiter.aconsume(member.user.pk, LIMIT)).backend == "redis"
    assert any("Redis rejected 1 fallback counters" in r.getMessage() for r in caplog.records)
    assert not limiter._pending
    spare.close()


@pytest.mark.django_db
def test_sync_rejected_fallback_counters_are_dropped(make_limiter, spare_redis, admin, member, caplog):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    spare_redis.stop()
    limiter.consume(admin.user.pk, LIMIT, amount=2)
    limiter.consume(member.user.pk, LIMIT, amount=3)
    spare_redis.start()
    spare = redis.Redis(port=spare_redis.port)
    spare.set(quota_key(admin.user.pk, datetime.now(UTC).date()), "not a number")
    with caplog.at_level(logging.WARNING, logger="usage.limiter"):
        assert limiter.peek(member.user.pk, LIMIT).backend == "redis"
    assert any("Redis rejected 1 fallback counters" in r.getMessage() for r in caplog.records)
    assert limiter.peek(member.user.pk, LIMIT).used == 3  # the other counter made it
    spare.close()


@pytest.mark.django_db
def test_fallback_counters_of_earlier_days_are_not_replayed(make_limiter, spare_redis, member):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    spare_redis.stop()
    limiter.consume(member.user.pk, LIMIT, amount=3, now=datetime(2031, 3, 14, 23, 59, tzinfo=UTC))
    spare_redis.start()
    late = limiter.consume(member.user.pk, LIMIT, now=datetime(2031, 3, 15, 0, 1, tzinfo=UTC))
    assert (late.backend, late.used) == ("redis", 1)
    assert limiter.peek(member.user.pk, LIMIT, now=datetime(2031, 3, 14, 23, 59, tzinfo=UTC)).used == 0


# -- neither store ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("with_redis", [True, False], ids=["redis-down", "no-redis"])
def test_unavailable_when_the_database_fails_too(with_redis, make_limiter, member):
    """A real failure: another session holds the counters table locked and our lock wait times out."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL's lock_timeout")
    limiter = make_limiter(f"redis://127.0.0.1:{free_port()}/0" if with_redis else "")
    params = connection.settings_dict
    with psycopg.connect(
        dbname=params["NAME"],
        user=params["USER"],
        host=params["HOST"],
        port=params["PORT"] or None,
        password=params["PASSWORD"] or None,
    ) as holder:
        holder.execute("LOCK TABLE external_mcp_quota_counters IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '200ms'")  # undone with the test's transaction
        with pytest.raises(QuotaUnavailable) as excinfo:
            limiter.consume(member.user.pk, LIMIT)
        assert isinstance(excinfo.value.__cause__, OperationalError)
        # (In a savepoint only because the test runs inside a transaction, which an error would abort.)
        with pytest.raises(QuotaUnavailable), transaction.atomic():
            limiter.peek(member.user.pk, LIMIT)
        holder.rollback()
    # The failed attempt left nothing behind and the database works again.
    assert limiter.consume(member.user.pk, LIMIT).used == 1


@pytest.mark.django_db(transaction=True)
async def test_async_unavailable_when_the_database_fails(make_limiter, member, monkeypatch):
    """The async path's worker threads use their own connections: here the failure is injected."""
    limiter = make_limiter(f"redis://127.0.0.1:{free_port()}/0")

    def broken(self, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(QuerySet, "update", broken)
    with pytest.raises(QuotaUnavailable):
        await limiter.aconsume(member.user.pk, LIMIT)
    monkeypatch.undo()
    assert (await limiter.aconsume(member.user.pk, LIMIT)).used == 1


# -- wiring ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_get_limiter_follows_settings(redis_url, redis_client, member, monkeypatch):
    monkeypatch.setattr(limiter_module, "_limiter", None)
    with override_settings(REDIS_URL=redis_url):
        limiter = get_limiter()
        assert get_limiter() is limiter
        assert limiter.redis_url == redis_url
        assert limiter.consume(member.user.pk, LIMIT).backend == "redis"
    with override_settings(REDIS_URL=""):
        database_only = get_limiter()
        assert database_only is not limiter
        assert database_only.consume(member.user.pk, LIMIT).backend == "database"
    limiter.close()
    database_only.close()


def test_default_url_comes_from_settings(redis_url):
    with override_settings(REDIS_URL=redis_url):
        assert UsageLimiter().redis_url == redis_url
    with override_settings(REDIS_URL=None):
        assert UsageLimiter().redis_url == ""
    with override_settings(REDIS_URL=redis_url):
        assert UsageLimiter("").redis_url == ""


@pytest.mark.django_db
def test_admin_lists_counters_read_only(client, django_user_model, member):
    QuotaCounter.objects.create(user=member.user, day=date(2031, 3, 14), used=17)
    superuser = django_user_model.objects.create_superuser("root", "root@example.com", "pw-rootroot")
    client.force_login(superuser)
    listing = client.get("/admin/usage/quotacounter/")
    assert listing.status_code == 200
    assert b"17" in listing.content
    assert client.get("/admin/usage/quotacounter/add/").status_code == 403
    counter = QuotaCounter.objects.get()
    assert client.post(f"/admin/usage/quotacounter/{counter.pk}/change/", {"used": 0}).status_code == 403
    assert QuotaCounter.objects.get().used == 17
    assert str(counter) == f"user {member.user.pk} on 2031-03-14: 17"
