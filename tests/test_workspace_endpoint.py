"""The workspace endpoint: every approved tool of the workspace's servers behind one URL, named
``<prefix>__<tool>``, served from the catalog, each call routed to its own server."""

from __future__ import annotations

import asyncio
import json

import pytest
from mcp.shared.exceptions import MCPError

from tests import mcp_peers
from tests.gateway import agent, register
from usage.models import Endpoint, UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]


def workspace_url(gateway) -> str:
    return f"{gateway.base}/api/v1/external-mcp/mcp"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
def test_two_servers_with_the_same_tool_names_meet_prefixed_and_each_call_reaches_its_own(
        admin, gateway, mode):
    with mcp_peers.default_peer() as first, mcp_peers.stateless_peer() as second:
        one = register(admin, first, name="Alpha")
        two = register(admin, second, name="Beta")

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, mode=mode) as client:
                tools = await client.list_tools()
                result = await client.call_tool("beta__echo", {"text": "to beta"})
                return sorted(t.name for t in tools.tools), result

        first.clear_requests()
        second.clear_requests()
        names, result = asyncio.run(scenario())
    assert names == sorted(f"{p}__{t}" for p in ("alpha", "beta") for t in ("add", "count", "echo", "slow_echo"))
    assert result.content[0].text == "to beta"
    assert [r.rpc_method for r in first.requests_to()] == []
    assert "tools/list" not in [r.rpc_method for r in second.requests_to()]
    calls = [r.json() for r in second.requests_to(rpc_method="tools/call")]
    assert [c["params"]["name"] for c in calls] == ["echo"]
    event = UsageEvent.objects.get(method="tools/call")
    assert (event.server_id, event.tool_name, event.endpoint, event.counted) == (two.pk, "echo", Endpoint.WORKSPACE,
                                                                                 True)
    assert one.pk != two.pk


def test_tools_list_is_paginated_from_the_catalog_and_a_foreign_cursor_is_refused(admin, gateway, settings):
    settings.EXTERNAL_MCP_TOOLS_PAGE_SIZE = 3
    with mcp_peers.default_peer() as first, mcp_peers.stateless_peer() as second:
        register(admin, first, name="Alpha")
        register(admin, second, name="Beta")
        first.clear_requests()
        second.clear_requests()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                names, cursor, pages = [], None, 0
                while True:
                    page = await client.list_tools(cursor=cursor)
                    names += [t.name for t in page.tools]
                    pages += 1
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                with pytest.raises(MCPError) as refused:
                    await client.list_tools(cursor="not-a-cursor-of-ours")
                return names, pages, refused.value

        names, pages, refused = asyncio.run(scenario())
        upstream_traffic = first.requests_to() + second.requests_to()
    assert pages == 3 and len(names) == 8 == len(set(names))
    assert names == sorted(names)
    assert refused.error.code == -32602 and "cursor" in refused.error.message
    assert upstream_traffic == []


def test_a_handshake_era_upstream_gets_one_session_from_the_gateway_reopened_once_when_it_forgets(admin, gateway):
    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()

        async def calls(client, n):
            return [(await client.call_tool("old__echo", {"text": f"call {i}"})).content[0].text for i in range(n)]

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                before = await calls(client, 3)
                await asyncio.get_running_loop().run_in_executor(None, old.restart)
                after = await calls(client, 2)
                return before, after

        before, after = asyncio.run(scenario())
        initializes = old.requests_to(rpc_method="initialize")
        sessions_used = {r.headers.get("mcp-session-id") for r in old.requests_to(rpc_method="tools/call")}
    assert before == ["call 0", "call 1", "call 2"] and after == ["call 0", "call 1"]
    assert len(initializes) == 2
    assert len(sessions_used) == 2 and None not in sessions_used
    assert all(r.headers.get("authorization") is None for r in initializes)


def test_progress_reaches_the_agent_through_a_routed_call(admin, gateway):
    with mcp_peers.default_peer() as peer:
        register(admin, peer, name="Counter")
        seen: list[float] = []

        async def on_progress(progress, total, message):
            seen.append(progress)

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                return await client.call_tool("counter__count", {"n": 3}, progress_callback=on_progress)

        result = asyncio.run(scenario())
    assert result.content[0].text == "counted to 3"
    assert seen == [1, 2, 3]


def test_a_member_that_is_down_fails_only_its_own_calls(admin, gateway):
    with mcp_peers.default_peer() as up, mcp_peers.stateless_peer() as down:
        register(admin, up, name="Up")
        register(admin, down, name="Down")
        down.stop()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                with pytest.raises(MCPError) as failed:
                    await client.call_tool("down__echo", {"text": "x"})
                ok = await client.call_tool("up__echo", {"text": "fine"})
                return names, failed.value, ok

        names, failed, ok = asyncio.run(scenario())
    assert "down__echo" in names and "up__echo" in names
    assert "Down" in failed.error.message
    assert ok.content[0].text == "fine"
    event = UsageEvent.objects.get(tool_name="echo", outcome="upstream_error")
    assert event.endpoint == Endpoint.WORKSPACE and not event.counted


def test_the_daily_quota_is_shared_with_the_server_endpoints_and_refusals_name_the_limit(admin, gateway, midday,
                                                                                      settings):
    from twinmcp import services as core_services

    core_services.profile_set_plan(user=admin.user, code="free")
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 2
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer, name="Quota")

        async def scenario():
            async with agent(f"{gateway.base}/api/v1/external-mcp/{server.pk}/mcp", admin.raw_key) as direct:
                await direct.call_tool("echo", {"text": "1"})
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                await client.call_tool("quota__echo", {"text": "2"})
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("quota__echo", {"text": "3"})
                return refused.value

        refused = asyncio.run(scenario())
    assert refused.error.code == -32029 and refused.error.data["limit"] == 2
    counted = UsageEvent.objects.filter(counted=True).order_by("created_at")
    assert [(e.endpoint, e.server_id, e.tool_name) for e in counted] == [
        (Endpoint.SERVER, server.pk, "echo"), (Endpoint.WORKSPACE, server.pk, "echo")]
    assert UsageEvent.objects.filter(outcome="quota", endpoint=Endpoint.WORKSPACE).count() == 1


def test_a_revoked_approval_leaves_a_connected_agents_next_list_and_the_agent_is_told(admin, gateway):
    from external_mcp import catalog

    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, name="Live")
        changed = asyncio.Event()

        async def on_message(message):
            if getattr(getattr(message, "root", message), "method", None) == "notifications/tools/list_changed" \
                    or "ToolListChanged" in type(message).__name__:
                changed.set()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, message_handler=on_message) as client:
                before = [t.name for t in (await client.list_tools()).tools]
                await asyncio.sleep(0.5)  # the SDK opens its GET stream after initialize
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: catalog.tools_disable(server=server, actor=admin.user, names=["echo"]))
                await asyncio.wait_for(changed.wait(), 30)
                after = [t.name for t in (await client.list_tools()).tools]
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("live__echo", {"text": "x"})
                return before, after, refused.value

        before, after, refused = asyncio.run(scenario())
    assert "live__echo" in before and "live__echo" not in after
    assert "disabled by a workspace admin" in refused.error.message


ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def rpc(method: str, request_id: int | None = 1, **params) -> dict:
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        message["id"] = request_id
    return message


def payload(answer) -> dict:
    """The JSON-RPC message of an answer, whether it came as JSON or as a one-event stream."""
    if answer.headers["content-type"].startswith("text/event-stream"):
        data = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
        return json.loads(data[-1])
    return answer.json()


def initialize(http, url: str) -> str:
    answer = http.post(url, json=rpc("initialize", protocolVersion="2025-11-25", capabilities={},
                                     clientInfo={"name": "t", "version": "1"}), headers=ACCEPT)
    assert answer.status_code == 200, answer.text
    assert payload(answer)["result"]["protocolVersion"] == "2025-11-25"
    return answer.headers["mcp-session-id"]


def test_agent_sessions_are_the_gateways_own_bound_to_their_key_and_deleting_one_closes_its_upstreams(
        admin, member, gateway):
    import httpx2

    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()
        url = workspace_url(gateway)
        own = {"authorization": f"Bearer {admin.raw_key}", **ACCEPT}
        with httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}"}, timeout=15) as http:
            session = initialize(http, url)
            call = http.post(url, json=rpc("tools/call", 2, name="old__echo", arguments={"text": "hi"}),
                             headers={**own, "mcp-session-id": session})
            upstream_session = old.requests_to(rpc_method="tools/call")[0].headers["mcp-session-id"]
            missing = http.post(url, json=rpc("tools/list", 3), headers=own)
            forged = http.post(url, json=rpc("tools/list", 4), headers={**own, "mcp-session-id": session + "x"})
            stranger = httpx2.post(url, json=rpc("tools/list", 5), headers={
                **ACCEPT, "authorization": f"Bearer {member.raw_key}", "mcp-session-id": session}, timeout=15)
            ended = http.delete(url, headers={"mcp-session-id": session})
            after = http.post(url, json=rpc("tools/list", 6), headers={**own, "mcp-session-id": session})
        closed = [r for r in old.requests if r.method == "DELETE"]
    assert call.status_code == 200 and "hi" in call.text
    assert call.headers["mcp-session-id"] == session != upstream_session
    assert (missing.status_code, forged.status_code, stranger.status_code) == (400, 404, 404)
    assert ended.status_code == 200 and after.status_code == 404
    assert [r.headers["mcp-session-id"] for r in closed] == [upstream_session]


def test_idle_agent_sessions_are_swept_and_their_upstream_sessions_closed(admin, gateway, settings):
    import httpx2

    from external_mcp.gateway import aggregate

    with mcp_peers.handshake_only_peer() as old:
        register(admin, old, name="Old")
        old.clear_requests()
        url = workspace_url(gateway)
        with httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}", **ACCEPT}, timeout=15) as http:
            session = initialize(http, url)
            http.post(url, json=rpc("tools/call", 2, name="old__echo", arguments={"text": "hi"}),
                      headers={"mcp-session-id": session})
            settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS = 0
            swept = asyncio.run(aggregate.sweep())
            settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS = 3600
            again = http.post(url, json=rpc("tools/list", 3), headers={"mcp-session-id": session})
        closed = [r for r in old.requests if r.method == "DELETE"]
    assert swept == 1 and again.status_code == 404 and len(closed) == 1


def test_2026_requests_whose_routing_headers_disagree_with_the_body_are_refused(admin, gateway):
    import httpx2

    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    with mcp_peers.stateless_peer() as peer:
        register(admin, peer, name="Modern")
        peer.clear_requests()
        headers = {**ACCEPT, "authorization": f"Bearer {admin.raw_key}", "mcp-protocol-version": "2026-07-28",
                   "mcp-method": "tools/call", "mcp-name": "modern__add"}
        answer = httpx2.post(workspace_url(gateway), headers=headers, timeout=15, json=rpc(
            "tools/call", 1, name="modern__echo", arguments={"text": "x"}, _meta=meta))
        routed = httpx2.post(workspace_url(gateway), headers={**headers, "mcp-name": "modern__echo"}, timeout=15,
                             json=rpc("tools/call", 2, name="modern__echo", arguments={"text": "x"}, _meta=meta))
        forwarded = peer.requests_to(rpc_method="tools/call")
    assert answer.status_code == 400 and payload(answer)["error"]["code"] == -32020
    assert routed.status_code == 200 and payload(routed)["result"]["resultType"] == "complete"
    assert len(forwarded) == 1
    assert (forwarded[0].headers["mcp-name"], forwarded[0].headers["mcp-method"]) == ("echo", "tools/call")
    assert forwarded[0].json()["params"]["name"] == "echo"


def conformance_peer() -> mcp_peers.RunningPeer:
    from tests.conformance.fixture_server import create_app

    return mcp_peers.RunningPeer(lambda _peer: create_app(), name="peer-conformance")


def test_resources_and_prompts_are_gathered_prefixed_and_a_slow_member_is_left_out(admin, gateway, settings):
    settings.EXTERNAL_MCP_FANOUT_TIMEOUT_MS = 500
    with conformance_peer() as rich, mcp_peers.slow_peer(0) as slow:
        register(admin, rich, name="Rich")
        register(admin, slow, name="Slow")
        slow.delay_s = 5

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key) as client:
                resources = [r.uri for r in (await client.list_resources()).resources]
                templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
                prompts = [p.name for p in (await client.list_prompts()).prompts]
                read = await client.read_resource("twinmcp://rich/test://static-text")
                prompt = await client.get_prompt("rich__test_simple_prompt")
                return resources, templates, prompts, read, prompt

        resources, templates, prompts, read, prompt = asyncio.run(scenario())
    assert "twinmcp://rich/test://static-text" in [str(r) for r in resources]
    assert "twinmcp://rich/test://template/{id}/data" in templates
    assert "rich__test_simple_prompt" in prompts
    assert read.contents[0].text
    assert prompt.messages
    rows = UsageEvent.objects.filter(method__in=["resources/list", "resources/read", "prompts/get"])
    assert {e.endpoint for e in rows} == {Endpoint.WORKSPACE}


def test_two_gateway_workers_serve_one_agent_session_alternately(admin, redis_url, midday):
    import httpx2

    from tests.gateway import GatewayProcess

    with mcp_peers.handshake_only_peer() as old, GatewayProcess(redis_url=redis_url, workers=1) as one, \
            GatewayProcess(redis_url=redis_url, workers=1) as two:
        register(admin, old, name="Old")
        old.clear_requests()
        path = "/api/v1/external-mcp/mcp"
        with httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}", **ACCEPT}, timeout=30) as http:
            session = initialize(http, one.base + path)
            texts = []
            for i, base in enumerate([two.base, one.base, two.base, one.base]):
                answer = http.post(base + path, headers={"mcp-session-id": session}, json=rpc(
                    "tools/call", i + 2, name="old__echo", arguments={"text": f"via {i}"}))
                assert answer.status_code == 200, answer.text
                texts.append(answer.text)
            ended = http.delete(two.base + path, headers={"mcp-session-id": session})
            after = http.post(one.base + path, headers={"mcp-session-id": session}, json=rpc("tools/list", 9))
        initializes = old.requests_to(rpc_method="initialize")
        deletes = [r for r in old.requests if r.method == "DELETE"]
    assert all(f"via {i}" in text for i, text in enumerate(texts))
    assert len(initializes) == 1 and len(deletes) == 1
    assert ended.status_code == 200 and after.status_code == 404


def test_a_paginated_upstreams_whole_catalog_is_listed_in_the_endpoints_own_pages(admin, gateway, settings):
    settings.EXTERNAL_MCP_TOOLS_PAGE_SIZE = 50
    with mcp_peers.paginated_peer(n_tools=120, page_size=50) as peer:
        register(admin, peer, name="Many")
        peer.clear_requests()

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, mode="2026-07-28") as client:
                pages, cursor = [], None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    pages.append([t.name for t in page.tools])
                    cursor = page.next_cursor
                    if cursor is None:
                        return pages

        pages = asyncio.run(scenario())
        upstream_lists = peer.requests_to(rpc_method="tools/list")
    assert [len(p) for p in pages] == [50, 50, 20]
    assert sum(pages, []) == sorted(f"many__tool_{i:03d}" for i in range(120))
    assert upstream_lists == []
