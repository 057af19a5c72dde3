"""The workspace and toolset endpoints under faults and bad input: the session store down or
absent, requests that are not what the protocol allows, endpoints a key may not see."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from external_mcp import catalog
from external_mcp.choices import PrefixMode
from external_mcp.models import Toolset
from tests import mcp_peers
from tests.gateway import agent, register
from tests.test_workspace_endpoint import ACCEPT, initialize, payload, rpc, workspace_url
from twinmcp import services as core_services

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]


def test_with_the_session_store_down_a_signed_session_still_works_on_fresh_upstream_sessions(
        admin, gateway, settings, spare_redis):
    core_services.profile_set_plan(user=admin.user, code="pro")  # a capped plan would wait for the quota's Redis
    settings.REDIS_URL = spare_redis.start().url
    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()
        url = workspace_url(gateway)
        with httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}", **ACCEPT}, timeout=30) as http:
            session = initialize(http, url)
            spare_redis.stop()
            answers = [http.post(url, headers={"mcp-session-id": session}, json=rpc(
                "tools/call", i, name="old__echo", arguments={"text": f"down {i}"})) for i in (2, 3)]
            spare_redis.start()
        initializes = old.requests_to(rpc_method="initialize")
    assert [a.status_code for a in answers] == [200, 200]
    assert all(f"down {i}" in a.text for i, a in zip((2, 3), answers, strict=True))
    assert len(initializes) == 2  # nothing could be kept: each request opened its own


def test_without_redis_sessions_live_in_the_process(admin, gateway, settings):
    from external_mcp.gateway import sessions

    core_services.profile_set_plan(user=admin.user, code="pro")
    settings.REDIS_URL = ""
    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                return [(await client.call_tool("old__echo", {"text": str(i)})).content[0].text for i in range(3)]

        texts = asyncio.run(scenario())
        initializes = old.requests_to(rpc_method="initialize")
    assert texts == ["0", "1", "2"] and len(initializes) == 1
    assert isinstance(sessions.store(), sessions.MemoryStore)


def test_a_2026_agent_reaches_a_handshake_era_upstream_through_a_session_kept_per_key(admin, gateway):
    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, mode="2026-07-28") as client:
                return [(await client.call_tool("old__echo", {"text": str(i)})).content[0].text for i in range(3)]

        texts = asyncio.run(scenario())
        initializes = old.requests_to(rpc_method="initialize")
        calls = old.requests_to(rpc_method="tools/call")
    assert texts == ["0", "1", "2"] and len(initializes) == 1
    assert {c.headers["mcp-protocol-version"] for c in calls} == {"2025-11-25"}


def test_tools_that_may_not_be_called_are_absent_and_refused_as_on_their_server_endpoint(admin, gateway):
    from external_mcp import services

    with mcp_peers.default_peer() as pending_peer, mcp_peers.stateless_peer() as off_peer:
        register(admin, pending_peer, name="Pending", approve=False)
        off = register(admin, off_peer, name="Off")
        services.server_update(server=off, actor=admin.user, enabled=False)

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                refusals = []
                for name in ("pending__echo", "off__echo", "nowhere__echo"):
                    with pytest.raises(MCPError) as refused:
                        await client.call_tool(name, {"text": "x"})
                    refusals.append(refused.value.error.message)
                return names, refusals

        names, refusals = asyncio.run(scenario())
    assert names == []
    assert "pending approval" in refusals[0]
    assert "disabled by a workspace admin" in refusals[1]
    assert "not in this endpoint's catalog" in refusals[2]


def test_a_toolset_serves_only_its_members_and_never_mode_keeps_upstream_names(admin, gateway):
    with mcp_peers.default_peer() as first, mcp_peers.stateless_peer() as second:
        one = register(admin, first, name="Alpha")
        two = register(admin, second, name="Beta")
        picked = Toolset.objects.create(workspace=admin.workspace, name="picked")
        picked.servers.add(one)
        picked.tools.add(two.tools.get(name="add"))
        plain = Toolset.objects.create(workspace=admin.workspace, name="plain", prefix_mode=PrefixMode.NEVER)
        plain.servers.add(two)

        async def names(toolset, mode):
            url = f"{gateway.base}/api/v1/external-mcp/toolsets/{toolset.pk}/mcp"
            async with agent(url, admin.raw_key, mode=mode) as client:
                listed = sorted(t.name for t in (await client.list_tools()).tools)
                with pytest.raises(MCPError):
                    await client.call_tool("beta__echo", {"text": "not a member"})
                return listed, await client.call_tool(listed[0], {"a": 1, "b": 2} if "add" in listed[0] else {
                    "text": "member"})

        from external_mcp.served_catalog import view_of

        resource_members = [m.id for m in view_of(admin.workspace.pk, picked.pk).serving("resources")]
        picked_names, _ = asyncio.run(names(picked, "legacy"))
        plain_names, result = asyncio.run(names(plain, "2026-07-28"))
    assert picked_names == ["alpha__add", "alpha__count", "alpha__echo", "alpha__slow_echo", "beta__add"]
    assert resource_members == [one.pk]  # a server picked for one tool lends it nothing else
    assert plain_names == ["add", "count", "echo", "slow_echo"]
    assert result.structured_content == {"result": 3.0}


def test_bad_requests_get_clear_json_errors(admin, outsider, gateway):
    from external_mcp import services

    foreign = Toolset.objects.create(workspace=outsider.workspace, name="theirs")
    services.server_create(workspace=admin.workspace, actor=admin.user, name="Any", base_url="http://127.0.0.1:9/mcp")
    url = workspace_url(gateway)
    headers = {"authorization": f"Bearer {admin.raw_key}", **ACCEPT}
    with httpx2.Client(headers=headers, timeout=15) as http:
        session = initialize(http, url)
        own = {"mcp-session-id": session}
        cases = {
            "batch": http.post(url, headers=own, json=[rpc("ping", 1), rpc("ping", 2)]),
            "garbage": http.post(url, headers=own, content=b"{not json"),
            "unknown method": http.post(url, headers=own, json=rpc("tools/frobnicate", 3)),
            "bad cursor": http.post(url, headers=own, json=rpc("tools/list", 4, cursor=7)),
            "foreign toolset": http.post(f"{gateway.base}/api/v1/external-mcp/toolsets/{foreign.pk}/mcp",
                                         json=rpc("ping", 5)),
            "not a toolset id": http.post(f"{gateway.base}/api/v1/external-mcp/toolsets/nope/mcp", json=rpc("ping", 6)),
            "no key": httpx2.post(url, json=rpc("ping", 7), headers=ACCEPT),
            "put": http.put(url, json=rpc("ping", 8)),
        }
        ping = http.post(url, headers=own, json=rpc("ping", 9))
        notified = http.post(url, headers=own, json=rpc("notifications/initialized", None))
    statuses = {name: answer.status_code for name, answer in cases.items()}
    assert statuses == {"batch": 400, "garbage": 400, "unknown method": 200, "bad cursor": 200,
                        "foreign toolset": 404, "not a toolset id": 404, "no key": 401, "put": 405}
    assert [e["error"]["code"] for e in payload(cases.pop("batch"))] == [-32600, -32600]
    codes = {name: payload(answer)["error"]["code"] for name, answer in cases.items()}
    assert codes["unknown method"] == -32601 and codes["bad cursor"] == -32602 and codes["garbage"] == -32700
    assert payload(ping)["result"] == {}
    assert notified.status_code == 202


def test_a_modern_agent_listening_hears_that_the_catalog_changed(admin, gateway):
    from mcp.client.subscriptions import listen

    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, name="Live")

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, mode="2026-07-28") as client:
                async with listen(client.session, tools_list_changed=True) as subscription:
                    await asyncio.get_running_loop().run_in_executor(
                        None, lambda: catalog.tools_disable(server=server, actor=admin.user, names=["add"]))
                    event = await asyncio.wait_for(anext(aiter(subscription)), 30)
                names = [t.name for t in (await client.list_tools()).tools]
                return event, names

        event, names = asyncio.run(scenario())
    assert type(event).__name__ == "ToolsListChanged"
    assert "live__add" not in names and "live__echo" in names


def test_an_expired_view_is_served_while_it_is_rebuilt_and_a_flush_drops_it_at_once(admin, settings):
    from external_mcp import served_catalog
    from twinmcp import invalidation

    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 60
    served_catalog.views.clear()
    served_catalog._last.clear()
    workspace_id = admin.workspace.pk

    async def scenario():
        first = await served_catalog.get_view(workspace_id)
        served_catalog.views.clear()  # its TTL ran out
        stale = await served_catalog.get_view(workspace_id)
        await asyncio.gather(*served_catalog._refreshing)
        rebuilt = await served_catalog.get_view(workspace_id)
        invalidation.flush_local()
        after_flush = await served_catalog.get_view(workspace_id)
        return first, stale, rebuilt, after_flush

    first, stale, rebuilt, after_flush = asyncio.run(scenario())
    assert stale is first and rebuilt is not first
    assert after_flush is not rebuilt and after_flush.digest == rebuilt.digest


def test_an_upstream_session_id_that_is_not_visible_ascii_is_refused_not_stored(admin, gateway):
    """A hostile upstream's session id would be sent back in a header on every later request."""
    import json as json_module

    from external_mcp.catalog import canonical_definition, definition_hash
    from external_mcp.choices import ToolState
    from external_mcp.models import ExternalMcpServer, ExternalMcpTool
    from external_mcp.services import server_create

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json_module.loads(body or b"{}")
        if request.get("method") != "initialize":
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        answer = json_module.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "h", "version": "1"}}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"mcp-session-id", b"a session id with spaces")]})
        await send({"type": "http.response.body", "body": answer})

    with mcp_peers.serve_asgi(app, name="hostile-session") as peer:
        server = server_create(workspace=admin.workspace, actor=admin.user, name="Hostile", base_url=peer.url)
        ExternalMcpServer.objects.filter(pk=server.pk).update(server_info={"era": "handshake",
                                                                           "capabilities": {"tools": {}}})
        definition = canonical_definition({"name": "echo", "inputSchema": {"type": "object"}})
        digest = definition_hash(definition)
        ExternalMcpTool.objects.create(server=server, name="echo", definition=definition, definition_hash=digest,
                                       state=ToolState.APPROVED, approved_definition=definition, approved_hash=digest)

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("hostile__echo", {})
                return refused.value

        refused = asyncio.run(scenario())
        calls = [r for r in peer.requests if r.rpc_method == "tools/call"]
    assert "did not open a session" in refused.error.message and "visible ASCII" in refused.error.message
    assert calls == []
