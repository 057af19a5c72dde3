"""The official MCP conformance suite gives the same per-check results directly against an SDK
fixture server, through the TwinMCP proxy (dns-rebinding-protection included), and through a
toolset that does not prefix names (where TwinMCP itself is the server the suite talks to)."""

from __future__ import annotations

import pytest

from external_mcp import catalog, health, proxy_cache, services
from external_mcp.models import ExternalMcpServer
from tests import mcp_peers
from tests.conformance.runner import ensure_cli, fixture_server, run_suite, summarize
from tests.gateway import close_gateway_connections
from twinmcp import services as core_services

pytestmark = pytest.mark.django_db(transaction=True)


def with_agent_key(app, key: str):
    """The conformance CLI cannot send headers; an agent would send its TwinMCP key, so add it
    to every request before the gateway sees it (in process: nothing else is changed)."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and not any(name == b"authorization" for name, _ in scope["headers"]):
            scope = {**scope, "headers": [*scope["headers"], (b"authorization", f"Bearer {key}".encode())]}
        await app(scope, receive, send)

    return wrapped


def direct_and_through(admin, settings, django_db_blocker, path_of) -> tuple[dict[str, str], dict[str, str]]:
    """The suite directly against the fixture, then through TwinMCP at ``path_of(server)`` once the
    fixture is registered, checked and approved."""
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 0
    proxy_cache.keys.clear()
    proxy_cache.servers.clear()
    core_services.profile_set_plan(user=admin.user, code="pro")
    cli = ensure_cli()
    from twinmcp.asgi import application

    with fixture_server() as url:
        direct = run_suite(url, cli=cli)
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="conformance",
                                        base_url=url)
        result, server = health.check_now(ExternalMcpServer.objects.get(pk=server.pk))
        assert result.ok, result.error_message
        catalog.tools_approve(server=server, actor=admin.user, select_all=True)
        path = path_of(server)
        gateway = mcp_peers.serve_asgi(with_agent_key(application, admin.raw_key), name="gateway", path="/").start()
        try:
            through = run_suite(gateway.base + path, cli=cli)
        finally:
            gateway.stop()
            with django_db_blocker.unblock():
                close_gateway_connections()
    return direct, through


def differences(direct: dict[str, str], other: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (direct.get(k), other.get(k)) for k in direct.keys() | other.keys() if direct.get(k) != other.get(k)}


def test_conformance_results_are_identical_directly_and_through_the_proxy(admin, flag_on, settings,
                                                                          django_db_blocker):
    direct, proxied = direct_and_through(admin, settings, django_db_blocker,
                                         lambda server: f"/api/v1/external-mcp/{server.pk}/mcp")
    counts = summarize(direct)
    assert counts.get("SUCCESS", 0) >= 40 and counts.get("FAILURE", 0) == 0
    assert direct["dns-rebinding-protection/localhost-host-rebinding-rejected"] == "SUCCESS"
    assert differences(direct, proxied) == {}


def test_conformance_results_are_identical_directly_and_through_a_toolset_that_keeps_names(
        admin, flag_on, settings, django_db_blocker):
    from external_mcp.choices import PrefixMode
    from external_mcp.models import Toolset

    def toolset_path(server) -> str:
        toolset = Toolset.objects.create(workspace=admin.workspace, name="conformance", prefix_mode=PrefixMode.NEVER)
        toolset.servers.add(server)
        return f"/api/v1/external-mcp/toolsets/{toolset.pk}/mcp"

    direct, through = direct_and_through(admin, settings, django_db_blocker, toolset_path)
    assert summarize(direct).get("FAILURE", 0) == 0
    assert differences(direct, through) == {}
