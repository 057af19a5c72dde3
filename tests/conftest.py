"""Shared fixtures: three named users (workspace admin, member, outsider) and their keys."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dt_time

import pytest
import time_machine
from rest_framework.test import APIClient

from twinmcp import services
from twinmcp.flags import flag_enable_for_workspace
from twinmcp.models import ApiKey, Role, Workspace


@dataclass
class Actor:
    user: object
    workspace: Workspace
    key: ApiKey
    raw_key: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.raw_key}")
        return client


def make_actor(django_user_model, username: str, workspace: Workspace, role: str) -> Actor:
    user = django_user_model.objects.create_user(username=username, password="pw-" + username * 2)
    services.member_add(workspace=workspace, user=user, role=role)
    key, raw = services.api_key_create(user=user, workspace=workspace, name=f"{username}-key")
    return Actor(user=user, workspace=workspace, key=key, raw_key=raw)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """The locmem cache (waffle flags, key cache) outlives each test's rolled-back transaction."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def loopback(settings):
    """Checks of live peers on 127.0.0.1 allowed, and passing however loaded the machine is
    (slowness has its own tests)."""
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS = 30_000
    settings.EXTERNAL_MCP_HEALTH_SLOW_MS = 30_000


@pytest.fixture(autouse=True)
def _usable_connection(django_db_blocker):
    """A module that ran the gateway ends its worker threads' connections (``close_gateway_connections``).
    In a browser module Playwright's running loop gives Django a context-local connection, so that
    call may end this thread's own one too: the next test then starts on a fresh one."""
    from django.db import connection

    if connection.connection is not None and not connection.in_atomic_block:
        with django_db_blocker.unblock():
            if not connection.is_usable():
                connection.close()
    yield


@pytest.fixture
def workspace(db) -> Workspace:
    return services.workspace_create(slug="acme", name="Acme")


@pytest.fixture
def other_workspace(db) -> Workspace:
    return services.workspace_create(slug="globex", name="Globex")


@pytest.fixture
def admin(django_user_model, workspace) -> Actor:
    return make_actor(django_user_model, "alice", workspace, Role.ADMIN)


@pytest.fixture
def member(django_user_model, workspace) -> Actor:
    return make_actor(django_user_model, "bob", workspace, Role.MEMBER)


@pytest.fixture
def outsider(django_user_model, other_workspace) -> Actor:
    return make_actor(django_user_model, "eve", other_workspace, Role.ADMIN)


@pytest.fixture
def flag_on(db, workspace, other_workspace) -> None:
    flag_enable_for_workspace(workspace=workspace)
    flag_enable_for_workspace(workspace=other_workspace)


@pytest.fixture
def admin_web(client, admin, flag_on):
    """Django's test client logged in as the workspace admin (web UI tests)."""
    client.force_login(admin.user)
    return client


@pytest.fixture
def member_web(client, member, flag_on):
    client.force_login(member.user)
    return client


@pytest.fixture
def outsider_web(client, outsider, flag_on):
    client.force_login(outsider.user)
    return client


@pytest.fixture
def redis_url() -> str:
    """The real Redis that `make test` starts; in CI its absence is a failure, not a skip."""
    url = os.environ.get("REDIS_URL", "")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("REDIS_URL is not set: run the suite with `make test`.")
        pytest.skip("REDIS_URL not set (run `make test` for the full suite)")
    return url


@pytest.fixture
def spare_redis(tmp_path):
    """A private redis-server the test starts, kills, pauses and restarts empty (see tests/redis_server.py)."""
    from tests.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run the suite with `make test`.")
    server = RedisServer(tmp_path)
    yield server
    server.close()


@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory):
    """One private ClickHouse server for the session (see tests/clickhouse_server.py)."""
    from tests.clickhouse_server import BINARY, ClickHouseServer

    if BINARY is None:
        pytest.fail("clickhouse-server is not installed: run the suite with `make test`.")
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse")).start()
    yield server
    server.close()


@pytest.fixture
def midday():
    """Quota counters are per UTC day: a test that ran across midnight would split its own counts.
    Noon of today, the clock running; a gateway in this process sees the same clock."""
    noon = datetime.combine(datetime.now(UTC).date(), dt_time(12), tzinfo=UTC)
    with time_machine.travel(noon, tick=True):
        yield


@pytest.fixture
def proxy_settings(settings, redis_url):
    """What the tests of the live gateway share: loopback upstreams allowed, no cache between a
    change and the next call, no quota left from an earlier test."""
    import redis as redis_lib

    from external_mcp import proxy_cache, served_catalog

    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32", "::1/128"]
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 0
    proxy_cache.keys.clear()
    proxy_cache.servers.clear()
    proxy_cache.flags.clear()
    served_catalog.views.clear()
    client = redis_lib.Redis.from_url(redis_url)
    for pattern in ("twinmcp:quota:*", "twinmcp:mcp-session*", "twinmcp:sse-bridge:*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def gateway(django_db_blocker):
    """The real ASGI application under uvicorn in a thread of this process, for one test module."""
    from tests.gateway import close_gateway_connections, start_gateway

    peer = start_gateway()
    yield peer
    peer.stop()
    with django_db_blocker.unblock():
        close_gateway_connections()
