"""The daily quota limiter, on real Redis and real PostgreSQL.

Redis faults are real too: a private ``redis-server`` this test starts on a free port (by its own
pid) is stopped, paused with ``CLIENT PAUSE``, flushed and restarted empty mid-test, or the limiter
is pointed at a port nobody listens on. The guarantee under test: never more uses admitted than the
limit, whatever Redis does; a capped call that cannot be decided is refused (``QuotaUnavailable``),
an uncapped one goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, date, datetime, timedelta, timezone

import psycopg
import pytest
import redis
import time_machine
from django.db import OperationalError, connection, transaction
from django.db.models import QuerySet
from django.test import override_settings
from prometheus_client import REGISTRY

from tests.mcp_peers import reserve_port
from twinmcp import services
from usage import limiter as limiter_module
from usage.limiter import UsageLimiter, get_limiter
from usage.models import QuotaCounter, QuotaEpoch, UsageEvent
from usage.quota import QuotaDecision, QuotaUnavailable, next_reset
from usage.quota_redis import CONSUME_SCRIPT, EPOCH_KEY, EXPIRY_GRACE_SECONDS, quota_key

LIMIT = 200
pytestmark = pytest.mark.usefixtures("midday")


# -- helpers and fixtures --------------------------------------------------------------------------


def unavailable_total() -> float:
    return REGISTRY.get_sample_value("external_mcp_quota_unavailable_total") or 0.0


def unavailable_active() -> float | None:
    return REGISTRY.get_sample_value("external_mcp_quota_unavailable_active")


def wipe_quota_keys(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match="twinmcp:quota:*", count=1000))
    if keys:
        client.delete(*keys)


def fields(decision: QuotaDecision) -> tuple:
    """A decision without its random ticket."""
    return decision.allowed, decision.limit, decision.used, decision.remaining, decision.reset_at, decision.backend


def charge(user, n: int = 1, *, at: datetime | None = None) -> None:
    """Committed counted events: what the proxy leaves for each admitted call."""
    UsageEvent.objects.bulk_create([
        UsageEvent(created_at=at or datetime.now(UTC), user=user, method="tools/call", tool_name="echo",
                   request_id=f"r{i}", latency_ms=1.0, outcome="ok", counted=True)
        for i in range(n)
    ])


def skip_on_in_memory_sqlite() -> None:
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip(
            "SQLite's shared-cache in-memory test database fails concurrent writers ('table is locked') "
            "instead of waiting for them; file databases, like the demo's, serialise them"
        )


@pytest.fixture(autouse=True)
def _availability_state_is_per_test():
    """The availability gauge and its flag are process-wide: leave them as the next test expects."""
    yield
    limiter_module._set_unavailable(False)


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

pytestmark_redis = pytest.mark.django_db(transaction=True)


@pytestmark_redis
async def test_redis_counts_and_refuses_past_the_limit(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    first = await limiter.aconsume(user_id, 3)
    assert fields(first) == (True, 3, 1, 2, next_reset(), "redis") and first.ticket
    assert (await limiter.aconsume(user_id, 3, amount=2)).used == 3
    refused = await limiter.aconsume(user_id, 3)
    assert (refused.allowed, refused.used, refused.remaining) == (False, 3, 0)
    # A refused call leaves the counter as it was.
    assert int(redis_client.get(quota_key(user_id, datetime.now(UTC).date()))) == 3
    # An amount that does not fit is refused whole, even on a fresh counter.
    big = await limiter.aconsume(user_id + 1000, 3, amount=4)
    assert (big.allowed, big.used, big.remaining) == (False, 0, 3)


@pytestmark_redis
async def test_redis_is_exact_under_concurrency(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    assert (await limiter.aconsume(user_id, LIMIT, amount=195)).used == 195

    decisions = await asyncio.gather(*(limiter.aconsume(user_id, LIMIT) for _ in range(50)))

    allowed = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(allowed) == 5
    assert sorted(d.used for d in allowed) == [196, 197, 198, 199, 200]
    assert {(d.used, d.remaining) for d in refused} == {(200, 0)}
    assert (await limiter.apeek(user_id, LIMIT)).used == 200
    assert int(redis_client.get(quota_key(user_id, datetime.now(UTC).date()))) == 200


@pytest.mark.django_db
def test_redis_sync_path_matches(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    assert limiter.consume(user_id, 2).used == 1
    assert limiter.consume(user_id, 2).used == 2
    refused = limiter.consume(user_id, 2)
    assert (refused.allowed, refused.used, refused.backend) == (False, 2, "redis")
    peeked = limiter.peek(user_id, 2)
    assert (peeked.allowed, peeked.used, peeked.remaining) == (False, 2, 0)


@pytestmark_redis
async def test_peek_does_not_count(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    await limiter.aconsume(user_id, 5, amount=4)
    for _ in range(3):
        peeked = await limiter.apeek(user_id, 5)
        assert (peeked.allowed, peeked.used, peeked.remaining) == (True, 4, 1)
    await limiter.aconsume(user_id, 5)
    assert (await limiter.apeek(user_id, 5)).allowed is False


@pytest.mark.django_db
def test_a_counter_starts_from_the_committed_events(make_limiter, redis_url, redis_client, member, admin):
    """A counter Redis does not have — the day's first call, or a Redis that forgot — starts from
    what the usage events say was charged today, never from zero."""
    limiter = make_limiter(redis_url)
    user = member.user
    charge(user, 3)
    charge(user, 4, at=datetime.now(UTC) - timedelta(days=1))  # yesterday's
    UsageEvent.objects.create(user=user, method="tools/call", request_id="refunded", latency_ms=1, outcome="error",
                              counted=False)
    charge(admin.user, 9)  # someone else's
    peeked = limiter.peek(user.pk, 5)
    assert (peeked.used, peeked.backend) == (3, "database")
    assert [limiter.consume(user.pk, 5).used for _ in range(2)] == [4, 5]
    assert limiter.consume(user.pk, 5).allowed is False
    charge(admin.user, 0)
    at_limit = limiter.consume(admin.user.pk, 9)
    assert (at_limit.allowed, at_limit.used) == (False, 9)


@pytest.mark.django_db
def test_redis_keys_expire_after_their_day(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    now = datetime.now(UTC)
    limiter.consume(user_id, LIMIT, now=now)
    ttl = redis_client.ttl(quota_key(user_id, now.date()))
    assert 0 < ttl <= (next_reset(now) - now).total_seconds() + EXPIRY_GRACE_SECONDS + 1

    late = datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC)
    limiter.consume(user_id, LIMIT, now=late)
    assert 0 < redis_client.ttl(quota_key(user_id, late.date())) <= 1 + EXPIRY_GRACE_SECONDS

    # A refused first call still leaves an expiring key, and a key someone wrote without an
    # expiry gets one on its next use.
    limiter.consume(user_id + 1, 0)
    assert redis_client.ttl(quota_key(user_id + 1, now.date())) > 0
    redis_client.set(quota_key(user_id + 2, now.date()), 195)
    assert limiter.consume(user_id + 2, LIMIT, now=now).used == 196
    assert 0 < redis_client.ttl(quota_key(user_id + 2, now.date())) <= 86400 + EXPIRY_GRACE_SECONDS


@pytestmark_redis
async def test_script_is_reloaded_after_redis_forgets_it(make_limiter, redis_url, redis_client, member):
    """What a Redis restart does to a registered script (NOSCRIPT), without the restart."""
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    assert (await limiter.aconsume(user_id, LIMIT)).used == 1
    redis_client.script_flush()
    assert (await limiter.aconsume(user_id, LIMIT)).used == 2
    redis_client.script_flush()
    assert (await asyncio.to_thread(limiter.consume, user_id, LIMIT)).used == 3


@pytest.mark.django_db(transaction=True)
def test_one_async_client_per_event_loop(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)

    async def use_and_close_connections() -> int:
        decision = await limiter.aconsume(member.user.pk, LIMIT)
        await limiter._async_redis[id(asyncio.get_running_loop())][1].connection_pool.disconnect()
        return decision.used

    # Each asyncio.run is a new loop: the limiter gives it its own client and forgets the closed one.
    assert asyncio.run(use_and_close_connections()) == 1
    assert asyncio.run(use_and_close_connections()) == 2
    assert len(limiter._async_redis) == 1
    limiter._async_redis.clear()


def test_a_decision_asked_again_with_its_ticket_is_the_same_decision(redis_client):
    """A reply lost to a timeout or a dropped connection is asked for again with the same ticket:
    Redis answers what it decided the first time instead of counting again."""
    script = redis_client.register_script(CONSUME_SCRIPT)
    redis_client.set(EPOCH_KEY, 0, nx=True)
    keys = [quota_key(424242, date(2031, 3, 14)), EPOCH_KEY, "twinmcp:quota-ticket:test-ticket"]
    redis_client.delete(keys[0], keys[2])
    args = [1, 2, 3600, "1", 60]
    assert script(keys=keys, args=args) == [1, 2]
    assert script(keys=keys, args=args) == [1, 2]
    assert int(redis_client.get(keys[0])) == 2
    redis_client.delete(keys[2])
    assert script(keys=keys, args=args) == [0, 2]
    redis_client.delete(*keys[::2])


@pytestmark_redis
async def test_a_refund_gives_an_admitted_call_back_once(make_limiter, redis_url, redis_client, member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    admitted = await limiter.aconsume(user_id, 2)
    await limiter.aconsume(user_id, 2)
    refused = await limiter.aconsume(user_id, 2)
    await limiter.arefund(user_id, admitted, 1)
    await limiter.arefund(user_id, admitted, 1)  # a retried refund
    await limiter.arefund(user_id, refused, 1)  # refused: nothing to give
    uncounted = QuotaDecision(True, None, 0, None, admitted.reset_at, "")
    await limiter.arefund(user_id, uncounted, 1)  # let through while Redis was down: nothing either
    assert (await limiter.apeek(user_id, 2)).used == 1


@pytestmark_redis
async def test_a_batch_is_refunded_in_parts_never_past_what_it_was_charged(make_limiter, redis_url, redis_client,
                                                                            member):
    limiter = make_limiter(redis_url)
    user_id = member.user.pk
    batch = await limiter.aconsume(user_id, 10, amount=4)
    await limiter.arefund(user_id, batch, 1, refunded_total=1)
    await limiter.arefund(user_id, batch, 1, refunded_total=1)  # asked again
    assert (await limiter.apeek(user_id, 10)).used == 3
    await limiter.arefund(user_id, batch, 2, refunded_total=3)
    assert (await limiter.apeek(user_id, 10)).used == 1
    await limiter.arefund(user_id, batch, 9, refunded_total=12)
    assert (await limiter.apeek(user_id, 10)).used == 0


@pytest.mark.django_db(transaction=True)
def test_a_seed_on_a_worker_whose_connection_died_still_decides(make_limiter, redis_url, redis_client, member,
                                                                 admin):
    """The limiter's worker thread keeps its connection between the rare seeds; PostgreSQL
    restarting (here: the connection killed) meanwhile must not refuse the next call."""
    limiter = make_limiter(redis_url, db_workers=1)

    async def first_call_of_the_day(user_id: int) -> QuotaDecision:
        return await limiter.aconsume(user_id, LIMIT)

    assert asyncio.run(first_call_of_the_day(member.user.pk)).allowed
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert asyncio.run(first_call_of_the_day(admin.user.pk)).allowed


# -- Redis faults ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_redis_down_refuses_capped_calls_and_lets_uncapped_ones_through(make_limiter, spare_redis, member, caplog):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    user_id = member.user.pk
    assert limiter.consume(user_id, LIMIT, amount=10).backend == "redis"
    before = unavailable_total()

    spare_redis.stop()
    with caplog.at_level(logging.WARNING, logger="usage.limiter"):
        with pytest.raises(QuotaUnavailable) as excinfo:
            limiter.consume(user_id, LIMIT)
        with pytest.raises(QuotaUnavailable):
            limiter.consume(user_id, LIMIT)
    assert excinfo.value.retry_after >= 1
    uncapped = limiter.consume(user_id, None)
    assert (uncapped.allowed, uncapped.backend, uncapped.ticket) == (True, "", "")
    assert unavailable_total() == before + 2
    assert unavailable_active() == 1
    assert "capped plans get 503" in caplog.text
    # Nothing was counted anywhere while Redis was away.
    assert not QuotaCounter.objects.exists()
    # What the usage page shows meanwhile: the committed truth.
    assert limiter.peek(user_id, LIMIT).backend == "database"


@pytest.mark.django_db
def test_redis_on_a_closed_port_refuses_capped_calls(make_limiter, member):
    closed = reserve_port()
    limiter = make_limiter(f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
    with pytest.raises(QuotaUnavailable):
        limiter.consume(member.user.pk, LIMIT)
    assert limiter.consume(member.user.pk, None).allowed
    closed.close()


@pytest.mark.django_db
def test_a_failed_redis_is_skipped_for_a_while(make_limiter, spare_redis, member):
    spare_redis.start()
    limiter = make_limiter(spare_redis.url, redis_retry_interval=3600)
    limiter.consume(member.user.pk, LIMIT)
    spare_redis.stop()
    with pytest.raises(QuotaUnavailable):
        limiter.consume(member.user.pk, LIMIT)
    spare_redis.start()
    with pytest.raises(QuotaUnavailable):
        limiter.consume(member.user.pk, LIMIT)
    with spare_redis.client() as client:
        assert client.get(EPOCH_KEY) is None  # Redis is back, but was not asked again before the interval


@pytest.mark.django_db(transaction=True)
def test_the_first_start_admits_at_once(make_limiter, spare_redis, member):
    """No epoch ever recorded: no call can have been admitted before, nothing to wait for."""
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    assert limiter.consume(member.user.pk, 3).allowed
    epoch = QuotaEpoch.objects.get()
    assert epoch.refuse_capped_until == epoch.started_at


@pytest.mark.django_db(transaction=True)
def test_processes_that_find_redis_empty_together_start_one_epoch(make_limiter, spare_redis, member):
    """Without the lock, a process that saw the first epoch's row a moment after it was written
    took Redis's emptiness for a reset and refused capped calls for the settle time."""
    spare_redis.start()
    limiters = [make_limiter(spare_redis.url) for _ in range(4)]

    async def together() -> list[QuotaDecision]:
        return await asyncio.gather(*(limiters[i % 4].aconsume(member.user.pk, 100) for i in range(40)))

    decisions = asyncio.run(together())
    assert sorted(d.used for d in decisions) == list(range(1, 41))
    assert QuotaEpoch.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fault", ["restarted empty", "flushed"])
def test_a_redis_that_forgot_refuses_capped_calls_until_admitted_calls_settle(fault, make_limiter, spare_redis,
                                                                             member, admin, settings, caplog):
    """Calls admitted just before Redis forgot may still be running, their events not yet
    committed: counting again from the committed events now would admit them twice."""
    settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS = 20000
    spare_redis.start()
    limiter = make_limiter(spare_redis.url)
    user_id = member.user.pk
    assert [limiter.consume(user_id, 3).allowed for _ in range(2)] == [True, True]
    charge(member.user, 1)  # one admitted call has finished; the other is still running

    if fault == "flushed":
        with spare_redis.client() as client:
            client.flushall()
    else:
        spare_redis.restart()
    with caplog.at_level(logging.WARNING, logger="usage.limiter"), pytest.raises(QuotaUnavailable) as excinfo:
        limiter.consume(user_id, 3)
    assert 0 < excinfo.value.retry_after <= 25
    assert "Redis lost the quota counters" in caplog.text
    assert unavailable_active() == 1
    assert limiter.consume(admin.user.pk, None).backend == ""  # uncapped plans go on
    latest = QuotaEpoch.objects.first()
    assert latest.refuse_capped_until - latest.started_at == timedelta(seconds=25)

    charge(member.user, 1)  # the running call finishes and is recorded
    spare_redis.end_settling()
    assert limiter.consume(user_id, 3).used == 3
    assert unavailable_active() == 0
    assert limiter.consume(user_id, 3).allowed is False


@pytest.mark.django_db(transaction=True)
async def test_a_paused_redis_decides_every_call_exactly_once(make_limiter, spare_redis, member, settings):
    """CLIENT PAUSE makes every attempt time out: each call asks again with its ticket until Redis
    answers, and the limit holds exactly — no call counted twice, none let through."""
    settings.EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS = 60000
    await asyncio.to_thread(spare_redis.start)
    limiter = make_limiter(spare_redis.url)
    user_id = member.user.pk
    assert (await limiter.aconsume(user_id, 10, amount=5)).used == 5
    spare_redis.pause(1500)
    decisions = await asyncio.gather(*(limiter.aconsume(user_id, 10) for _ in range(20)))
    assert sorted(d.used for d in decisions if d.allowed) == [6, 7, 8, 9, 10]
    assert (await limiter.apeek(user_id, 10)).used == 10


# -- database backend ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_database_counts_and_refuses_past_the_limit(make_limiter, member):
    limiter = make_limiter("")
    user_id = member.user.pk
    assert limiter.peek(user_id, 3) == QuotaDecision(True, 3, 0, 3, next_reset(), "database")
    assert fields(limiter.consume(user_id, 3)) == (True, 3, 1, 2, next_reset(), "database")
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


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend", ["redis", "database"])
def test_a_refund_after_midnight_goes_back_to_the_day_that_counted(backend, limiter_for, member):
    """A call admitted at 23:59:59 and refunded after midnight must not give the user an extra
    call on the new day."""
    limiter = limiter_for(backend)
    user_id = member.user.pk
    with time_machine.travel(datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC), tick=False):
        late = limiter.consume(user_id, 5)
    with time_machine.travel(datetime(2031, 3, 15, 0, 0, 1, tzinfo=UTC), tick=False):
        assert limiter.consume(user_id, 5).used == 1
        asyncio.run(limiter.arefund(user_id, late, 1))
        assert limiter.peek(user_id, 5).used == 1
        assert limiter.peek(user_id, 5, now=datetime(2031, 3, 14, 12, tzinfo=UTC)).used == 0


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["redis", "database"])
def test_pro_plan_is_never_refused_but_counted(backend, limiter_for, member):
    limiter = limiter_for(backend)
    services.profile_set_plan(user=member.user, code="pro")
    member.user.refresh_from_db()
    limit = member.user.profile.plan.effective_daily_limit
    assert limit is None
    assert fields(limiter.consume(member.user.pk, limit, amount=1000)) == (True, None, 1000, None, next_reset(),
                                                                          backend)
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


# -- the database fails ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_unavailable_when_the_database_fails(make_limiter, member):
    """Without Redis the database is the store: a real failure (another session holds the
    counters table locked and our lock wait times out) refuses the call, never lets it through."""
    limiter = make_limiter("")
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
async def test_a_counter_that_cannot_be_seeded_refuses_capped_calls(make_limiter, redis_url, redis_client, member,
                                                                      monkeypatch):
    """The committed events cannot be read (injected: the async path's worker threads use their
    own connections): a capped call is refused rather than counted from zero."""
    limiter = make_limiter(redis_url)

    def broken(self, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(QuerySet, "count", broken)
    with pytest.raises(QuotaUnavailable):
        await limiter.aconsume(member.user.pk, LIMIT)
    assert (await limiter.aconsume(member.user.pk, None)).allowed
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
