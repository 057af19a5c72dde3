"""The quota and the usage record hold under faults, through the gateway as production runs it:
two uvicorn worker processes on PostgreSQL, a private Redis this test kills, pauses and restarts
empty, CPU starved by the test's own busy loops, a worker killed with SIGKILL mid-burst.

What must hold: never more calls admitted than the limit; every admitted call (an HTTP 200 with
a result) has a committed, counted usage event; a call that cannot be decided is a 503 with
Retry-After, never a silent pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import aiohttp
import pytest
import time_machine

from external_mcp.models import ExternalMcpServer
from tests import mcp_peers
from tests.gateway import GatewayProcess, register
from tests.redis_server import RedisServer
from twinmcp import services as core_services
from usage.models import UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("midday")]

LIMIT = 30
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(autouse=True)
def _gateway_settings(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


@pytest.fixture
def upstream() -> Iterator[mcp_peers.RunningPeer]:
    with mcp_peers.stateless_peer() as peer:
        yield peer


@pytest.fixture
def server(admin, flag_on, upstream) -> ExternalMcpServer:
    return register(admin, upstream)


@dataclass
class Burst:
    """Concurrent tools/call requests, each with its own X-Request-Id, and what came back."""

    url: str
    key: str
    answers: list[tuple[str, int, dict | None]] = field(default_factory=list)
    failures: int = 0

    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.answers]

    def admitted(self) -> list[str]:
        return [rid for rid, status, body in self.answers if status == 200 and body and "result" in body]

    async def run(self, total: int, concurrency: int) -> Burst:
        pending = iter(range(total))
        headers = {**HEADERS, "Authorization": f"Bearer {self.key}"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker() -> None:
                for i in pending:
                    rid = uuid.uuid4().hex
                    body = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                            "params": {"name": "echo", "arguments": {"text": str(i)}}}
                    try:
                        async with session.post(self.url, data=json.dumps(body),
                                                headers={**headers, "X-Request-Id": rid}) as response:
                            raw = await response.read()
                            self.answers.append((rid, response.status, _json(raw)))
                    except aiohttp.ClientError:
                        self.failures += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return self


def _json(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def until_refused(burst: Burst, timeout: float = 60) -> Burst:
    """Small bursts until the quota refuses one (429): each gateway worker stops skipping a Redis
    that failed a moment after it answers again, not at once."""
    deadline = time.monotonic() + timeout
    while 429 not in burst.statuses():
        if time.monotonic() > deadline:
            raise AssertionError(f"no 429 within {timeout} s: {burst.statuses()[-20:]}")
        await burst.run(4, 2)
    return burst


def counted_events() -> set[str]:
    return set(UsageEvent.objects.filter(method="tools/call", counted=True).values_list("request_id", flat=True))


def gateway(redis: RedisServer, **env: str) -> GatewayProcess:
    return GatewayProcess(redis_url=redis.url, workers=2,
                          env={"EXTERNAL_MCP_FREE_DAILY_LIMIT": str(LIMIT), **env})


def test_two_workers_admit_exactly_the_limit(admin, server, upstream, spare_redis):
    spare_redis.start()
    with gateway(spare_redis) as gw:
        burst = asyncio.run(Burst(gw.url(server), admin.raw_key).run(120, 16))
    assert burst.failures == 0
    assert len(burst.admitted()) == LIMIT
    assert burst.statuses().count(429) == 120 - LIMIT
    assert counted_events() == set(burst.admitted())
    assert len(upstream.requests_to(rpc_method="tools/call")) == LIMIT


def test_the_workers_run_on_the_test_clock(admin, server, spare_redis):
    """What the other tests rely on to count within one UTC day whenever they run."""
    spare_redis.start()
    with time_machine.travel(datetime(2031, 3, 4, 12, tzinfo=UTC), tick=True), gateway(spare_redis) as gw:
        burst = asyncio.run(Burst(gw.url(server), admin.raw_key).run(4, 2))
    assert len(burst.admitted()) == 4
    days = {e.created_at.date() for e in UsageEvent.objects.filter(method="tools/call")}
    assert days == {date(2031, 3, 4)}


def test_redis_killed_mid_burst_and_restarted_empty_admits_no_more_than_the_limit(admin, server, spare_redis):
    spare_redis.start()
    with gateway(spare_redis) as gw:
        url = gw.url(server)

        async def scenario() -> tuple[Burst, Burst]:
            burst = Burst(url, admin.raw_key)
            running = asyncio.ensure_future(burst.run(150, 4))
            await until(lambda: len(burst.admitted()) >= 10, "10 admitted calls")
            await asyncio.to_thread(spare_redis.stop)
            await until(lambda: 503 in burst.statuses(), "a 503 while Redis is down")
            await asyncio.to_thread(spare_redis.start)  # empty: it forgot every counter
            await running
            # The reset settles (calls admitted before it may still be running): then the counter
            # starts again from the committed events.
            await asyncio.to_thread(spare_redis.end_settling)
            return burst, await until_refused(Burst(url, admin.raw_key))

        first, second = asyncio.run(scenario())
    admitted = first.admitted() + second.admitted()
    assert len(admitted) == LIMIT
    assert set(first.statuses()) <= {200, 429, 503}
    unavailable = [body for _, status, body in first.answers if status == 503]
    assert unavailable and all(body["error"]["code"] == -32005 for body in unavailable)
    assert counted_events() == set(admitted)


def test_a_user_at_the_limit_gets_nothing_more_from_a_redis_restarted_empty(admin, server, spare_redis):
    spare_redis.start()
    with gateway(spare_redis) as gw:
        url = gw.url(server)
        first = asyncio.run(Burst(url, admin.raw_key).run(LIMIT, 4))
        assert len(first.admitted()) == LIMIT
        spare_redis.restart()
        settling = asyncio.run(Burst(url, admin.raw_key).run(10, 2))
        spare_redis.end_settling()
        after = asyncio.run(until_refused(Burst(url, admin.raw_key)))
    assert set(settling.statuses()) == {503}
    assert after.admitted() == []
    assert counted_events() == set(first.admitted())


def test_a_paused_redis_admits_exactly_what_is_left(admin, server, spare_redis):
    spare_redis.start()
    # A Redis that answers late is waited for: each call asks again with its ticket.
    with gateway(spare_redis, EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS="60000") as gw:
        url = gw.url(server)
        before = asyncio.run(Burst(url, admin.raw_key).run(LIMIT - 5, 4))

        async def scenario() -> Burst:
            burst = Burst(url, admin.raw_key)
            running = asyncio.ensure_future(burst.run(120, 16))
            await asyncio.to_thread(spare_redis.pause, 800)
            return await running

        burst = asyncio.run(scenario())
    assert len(burst.admitted()) == 5
    assert burst.statuses().count(429) == 115
    assert counted_events() == set(before.admitted() + burst.admitted())


@contextlib.contextmanager
def cpu_burners(count: int = 2) -> Iterator[None]:
    """Busy loops in processes of our own, bounded in time, stopped by pid."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 300\n"
                               "while time.time() < end: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_a_starved_cpu_admits_exactly_the_limit(admin, server, spare_redis):
    spare_redis.start()
    with gateway(spare_redis, EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS="60000") as gw, cpu_burners():
        burst = asyncio.run(Burst(gw.url(server), admin.raw_key).run(120, 16))
    assert (burst.failures, len(burst.admitted())) == (0, LIMIT), burst.answers[:3]
    assert burst.statuses().count(429) == 120 - LIMIT
    assert counted_events() == set(burst.admitted())


def test_a_worker_killed_mid_burst_loses_no_answered_call(admin, server, spare_redis):
    """Every answer an agent received was recorded first: SIGKILL can only lose calls that were
    not answered."""
    core_services.profile_set_plan(user=admin.user, code="pro")
    spare_redis.start()
    with gateway(spare_redis) as gw:

        async def scenario() -> Burst:
            burst = Burst(gw.url(server), admin.raw_key)
            running = asyncio.ensure_future(burst.run(200, 8))
            await until(lambda: len(burst.answers) >= 40, "40 answers")
            gw.kill_worker()
            return await running

        burst = asyncio.run(scenario())
    admitted = set(burst.admitted())
    assert len(admitted) >= 40
    assert admitted <= counted_events()
    assert set(burst.statuses()) <= {200}
