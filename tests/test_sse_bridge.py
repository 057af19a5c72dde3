"""HTTP+SSE upstreams through the gateway: agents speak Streamable HTTP, the gateway holds the
upstream's stream per agent session and relays, on one worker and across workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitResult
from pydantic import BaseModel

from external_mcp import catalog, demo_upstream, health, services
from external_mcp.gateway import bridge, bridge_store
from tests import mcp_peers
from tests.everything_peer import everything_sse
from tests.gateway import GatewayProcess, agent, count_with_progress, proxy_url, register
from tests.inspector_cli import inspect
from tests.test_proxy import wait_for
from tests.test_sse_upstream import raw_sse_server
from twinmcp import services as core_services
from usage.models import UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("midday", "proxy_settings")]

ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
WORKSPACE = "/api/v1/external-mcp/mcp"


def rpc(method: str, request_id: int | None = 1, **params) -> dict:
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        message["id"] = request_id
    return message


def payloads(answer: httpx2.Response) -> list[dict]:
    """The JSON-RPC messages of an answer, JSON or an event stream."""
    if answer.headers.get("content-type", "").startswith("application/json"):
        return [answer.json()]
    return [json.loads(line[5:]) for line in answer.text.splitlines() if line.startswith("data:")]


@pytest.mark.parametrize(("mode", "workspace_mode"), [("legacy", "legacy"), ("auto", "2026-07-28")])
def test_an_sdk_client_calls_an_sse_server_through_both_endpoints(admin, flag_on, gateway, mode, workspace_mode):
    """The per-server endpoint relays the agent's own era (an ``auto`` client falls back to
    initialize there); the workspace endpoint serves a 2026-07-28 agent too, through its own session."""
    with mcp_peers.sse_peer() as peer:
        server = register(admin, peer, name="legacy")

        async def scenario():
            async with agent(proxy_url(gateway, server), admin.raw_key, mode=mode) as client:
                tools = await client.list_tools()
                echoed = await client.call_tool("echo", {"text": "hi"})
                counted, progress = await count_with_progress(client, "count", 3)
            async with agent(f"{gateway.base}{WORKSPACE}", admin.raw_key, mode=workspace_mode) as client:
                via_workspace = await client.call_tool("legacy__echo", {"text": "all"})
            return sorted(t.name for t in tools.tools), echoed, counted, progress, via_workspace

        names, echoed, counted, progress, via_workspace = asyncio.run(scenario())
        # An agent's DELETE closes the stream held for it; a 2026-07-28 agent has no session to
        # delete: the workspace endpoint keeps the upstream session of its key until it idles out.
        wait_for(lambda: len(bridge._held) == (0 if workspace_mode == "legacy" else 1))
    assert {"echo", "count", "add"} <= set(names)
    assert echoed.content[0].text == "hi" and via_workspace.content[0].text == "all"
    assert "counted to 3" in counted.content[0].text
    assert progress == [1, 2, 3]
    events = UsageEvent.objects.filter(server_id=server.pk, method="tools/call")
    wait_for(lambda: events.count() >= 3)
    assert events.filter(outcome="ok", counted=True).count() == 3


def test_two_gateways_serve_one_agent_session_alternately(admin, flag_on, redis_url):
    with mcp_peers.sse_peer() as peer, GatewayProcess(redis_url=redis_url, workers=1) as one, \
            GatewayProcess(redis_url=redis_url, workers=1) as two:
        server = register(admin, peer, name="legacy")
        path = f"/api/v1/external-mcp/{server.pk}/mcp"
        with httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}", **ACCEPT}, timeout=30) as http:
            opened = http.post(one.base + path, json=rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                                                         clientInfo={"name": "t", "version": "1"}))
            assert opened.status_code == 200, opened.text
            session = {"mcp-session-id": opened.headers["mcp-session-id"]}
            http.post(two.base + path, headers=session, json=rpc("notifications/initialized", None))
            texts = []
            for i, base in enumerate([two.base, one.base, two.base, one.base]):
                answer = http.post(base + path, headers=session, json=rpc(
                    "tools/call", i + 2, name="echo", arguments={"text": f"via {i}"}))
                assert answer.status_code == 200, answer.text
                texts.append(payloads(answer)[-1]["result"]["content"][0]["text"])
            ended = http.delete(two.base + path, headers=session)
            after = http.post(one.base + path, headers=session, json=rpc("tools/list", 9))
        streams = [r for r in peer.requests if r.method == "GET" and r.path == "/sse"]
    assert texts == [f"via {i}" for i in range(4)]
    assert ended.status_code == 200 and after.status_code == 404
    assert len(streams) == 2  # the check's, and the one agent session's


def _initialize(http: httpx2.Client, url: str) -> httpx2.Response:
    return http.post(url, json=rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                                   clientInfo={"name": "t", "version": "1"}))


def _client(admin) -> httpx2.Client:
    return httpx2.Client(headers={"authorization": f"Bearer {admin.raw_key}", **ACCEPT}, timeout=60)


def test_an_upstream_that_drops_its_stream_ends_the_session_and_the_agent_starts_again(admin, flag_on, gateway):
    with mcp_peers.sse_peer() as peer, _client(admin) as http:
        server = register(admin, peer, name="legacy")
        url = proxy_url(gateway, server)
        session = {"mcp-session-id": _initialize(http, url).headers["mcp-session-id"]}
        http.post(url, headers=session, json=rpc("notifications/initialized", None))
        with httpx2.Client(headers=http.headers, timeout=60) as other, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(other.post, url, headers=session, json=rpc(
                "tools/call", 5, name="slow_echo", arguments={"text": "late", "delay_ms": 60000}))
            wait_for(lambda: peer.requests_to("/messages/", rpc_method="tools/call"))
            peer.restart()
            cut = pending.result(timeout=60)
        after = http.post(url, headers=session, json=rpc("tools/list", 6))
        again = _initialize(http, url)
        held = [h.sid for h in bridge._held.values()]
    assert cut.status_code == 200
    assert payloads(cut)[-1]["error"]["code"] == -32023  # unanswered: the stream ended first
    assert after.status_code == 404
    assert again.status_code == 200 and held == [again.headers["mcp-session-id"]]


def test_open_streams_are_capped_per_server(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_SSE_MAX_STREAMS_PER_SERVER = 1
    with mcp_peers.sse_peer() as peer, _client(admin) as http:
        server = register(admin, peer, name="legacy")
        url = proxy_url(gateway, server)
        first = _initialize(http, url)
        refused = _initialize(http, url)
        http.delete(url, headers={"mcp-session-id": first.headers["mcp-session-id"]})
        third = _initialize(http, url)
        http.delete(url, headers={"mcp-session-id": third.headers["mcp-session-id"]})
    assert first.status_code == 200 and third.status_code == 200
    assert refused.status_code == 503 and refused.json()["error"]["code"] == -32027


def test_a_session_is_bound_to_its_key(admin, member, flag_on, gateway):
    with mcp_peers.sse_peer() as peer, _client(admin) as http, _client(member) as intruder:
        server = register(admin, peer, name="legacy")
        url = proxy_url(gateway, server)
        session = {"mcp-session-id": _initialize(http, url).headers["mcp-session-id"]}
        stolen = intruder.post(url, headers=session, json=rpc("tools/list", 2))
        forged = http.post(url, headers={"mcp-session-id": "x" + session["mcp-session-id"]},
                           json=rpc("tools/list", 3))
        http.delete(url, headers=session)
    assert stolen.status_code == 404 and forged.status_code == 404


def test_the_owner_dying_ends_the_session_clearly_and_another_worker_starts_again(admin, flag_on, redis_url):
    with mcp_peers.sse_peer() as peer, GatewayProcess(redis_url=redis_url, workers=1) as one, \
            GatewayProcess(redis_url=redis_url, workers=1) as two, _client(admin) as http:
        server = register(admin, peer, name="legacy")
        path = f"/api/v1/external-mcp/{server.pk}/mcp"
        session = {"mcp-session-id": _initialize(http, one.base + path).headers["mcp-session-id"]}
        os.kill(one.proc.pid, signal.SIGKILL)  # the owner dies without a word; the kernel closes its stream
        orphaned = http.post(two.base + path, headers=session, json=rpc("tools/call", 2, name="echo",
                                                                       arguments={"text": "x"}))
        again = _initialize(http, two.base + path)
        session = {"mcp-session-id": again.headers["mcp-session-id"]}
        http.post(two.base + path, headers=session, json=rpc("notifications/initialized", None))
        answer = http.post(two.base + path, headers=session, json=rpc("tools/call", 3, name="echo",
                                                                     arguments={"text": "back"}))
    assert orphaned.status_code == 404 and "start a new one" in orphaned.json()["error"]["message"]
    assert payloads(answer)[-1]["result"]["content"][0]["text"] == "back"


class Name(BaseModel):
    name: str


def _asking_server():
    server = mcp_peers.build_demo_server("peer-sse-asking")

    @server.tool(description="Ask the user their name.")
    async def greet(ctx: Context) -> str:
        answer = await ctx.elicit("Your name?", Name)
        if answer.action == "accept" and answer.data:
            return f"hello {answer.data.name}"
        return f"no name ({answer.action})"

    return server


def test_an_elicitation_reaches_an_agent_that_declared_it_and_is_refused_for_one_that_did_not(admin, flag_on,
                                                                                             gateway):
    async def reply(context, params):
        return ElicitResult(action="accept", content={"name": "Ada"})

    with mcp_peers.sse_peer(server_factory=_asking_server) as peer:
        server = register(admin, peer, name="asking")

        async def scenario():
            async with agent(proxy_url(gateway, server), admin.raw_key, elicitation_callback=reply) as client:
                asked = await client.call_tool("greet", {})
            async with agent(proxy_url(gateway, server), admin.raw_key) as client:
                with pytest.raises(MCPError, match="did not declare the elicitation capability"):
                    await client.call_tool("greet", {})
            return asked

        asked = asyncio.run(scenario())
        answered = [r.json() for r in peer.requests_to("/messages/") if r.rpc_method is None]
    assert asked.content[0].text == "hello Ada"
    assert any(m.get("result", {}).get("action") == "accept" for m in answered)


def test_without_redis_one_process_bridges_from_memory(admin, flag_on, gateway, settings):
    settings.REDIS_URL = ""  # make run: one process, the sessions and boxes in its memory
    with mcp_peers.sse_peer() as peer:
        server = register(admin, peer, name="legacy")

        async def scenario():
            async with agent(proxy_url(gateway, server), admin.raw_key) as client:
                return await count_with_progress(client, "count", 2)

        counted, progress = asyncio.run(scenario())
        wait_for(lambda: not bridge._held)
    assert "counted to 2" in counted.content[0].text and progress == [1, 2]
    assert isinstance(bridge_store.store(), bridge_store.MemoryBridgeStore)


def test_an_idle_session_ends_and_closes_its_stream(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS = 1
    with mcp_peers.sse_peer() as peer, _client(admin) as http:
        server = register(admin, peer, name="legacy")
        url = proxy_url(gateway, server)
        session = {"mcp-session-id": _initialize(http, url).headers["mcp-session-id"]}
        wait_for(lambda: not bridge._held)  # the owner's next heartbeat finds the session expired
        after = http.post(url, headers=session, json=rpc("tools/list", 2))
    assert after.status_code == 404


def test_make_runs_demo_upstream_serves_both_transports_and_both_reach_agents(admin, flag_on, gateway):
    demo = mcp_peers.RunningPeer(lambda _peer: demo_upstream.build_app(), name="demo", path="/sse")
    with demo:
        legacy = register(admin, demo, name="Legacy demo")
        modern = services.server_create(workspace=admin.workspace, actor=admin.user, name="Demo",
                                        base_url=f"{demo.base}/mcp")
        _, modern = health.check_now(modern)

        async def scenario():
            async with agent(proxy_url(gateway, legacy), admin.raw_key) as client:
                direct = await client.call_tool("echo", {"text": "per-server"})
            async with agent(f"{gateway.base}{WORKSPACE}", admin.raw_key) as client:
                aggregated = await client.call_tool(f"{legacy.prefix}__echo", {"text": "workspace"})
            return direct, aggregated

        direct, aggregated = asyncio.run(scenario())
    legacy.refresh_from_db()
    assert legacy.status == "healthy" and legacy.transport == "auto" and legacy.transport_found == "sse"
    assert modern.status == "healthy" and modern.transport_found == "streamable_http"
    assert direct.content[0].text == "per-server" and aggregated.content[0].text == "workspace"


def test_the_session_store_down_is_a_clear_503_and_its_return_serves_again(admin, flag_on, gateway, settings,
                                                                          spare_redis):
    core_services.profile_set_plan(user=admin.user, code="pro")  # uncapped: no quota decision needs Redis
    spare_redis.start()
    settings.REDIS_URL = spare_redis.url
    with mcp_peers.sse_peer() as peer, _client(admin) as http:
        server = register(admin, peer, name="legacy")
        url = proxy_url(gateway, server)
        session = {"mcp-session-id": _initialize(http, url).headers["mcp-session-id"]}
        spare_redis.stop()
        down = http.post(url, headers=session, json=rpc("tools/list", 2))
        refused = _initialize(http, url)
        spare_redis.start()  # back, empty: the session it held is gone, a new one works
        lost = http.post(url, headers=session, json=rpc("tools/list", 3))
        again = _initialize(http, url)
    assert down.status_code == 503 and down.json()["error"]["code"] == -32028
    assert refused.status_code == 503 and "session store" in refused.json()["error"]["message"]
    assert lost.status_code == 404 and again.status_code == 200


def test_a_hostile_stream_cannot_send_the_gateways_posts_elsewhere_nor_break_it(admin, flag_on, gateway):
    with mcp_peers.default_peer() as elsewhere, _client(admin) as http:
        away = f"event: endpoint\ndata: {elsewhere.base}/messages?session_id=1\n\n".encode()
        with raw_sse_server([away]) as peer:
            server = services.server_create(workspace=admin.workspace, actor=admin.user, name="away",
                                            base_url=peer.url, transport="sse")
            refused = _initialize(http, proxy_url(gateway, server))
        garbage = [b"event: endpoint\ndata: /messages?session_id=abc\n\n"]
        with raw_sse_server(garbage, answer=b"event: message\ndata: \xff not json\n\n") as peer:
            server = services.server_create(workspace=admin.workspace, actor=admin.user, name="garbage",
                                            base_url=peer.url, transport="sse")
            broken = _initialize(http, proxy_url(gateway, server))
        posted_elsewhere = [r for r in elsewhere.requests if r.method == "POST"]
    assert refused.status_code == 502 and "another origin" in refused.json()["error"]["message"]
    assert not posted_elsewhere
    assert broken.status_code == 200 and payloads(broken)[-1]["error"]["code"] == -32023
    wait_for(lambda: not bridge._held)


def test_the_typescript_everything_server_over_http_sse_through_both_endpoints(admin, flag_on, gateway):
    with everything_sse() as url:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="Everything", base_url=url)
        result, server = health.check_now(server)
        assert result.ok, result.error_message
        catalog.tools_approve(server=server, actor=admin.user, names=["echo", "get-sum"])

        async def scenario():
            async with agent(proxy_url(gateway, server), admin.raw_key) as client:
                listed = await client.list_tools()
                echoed = await client.call_tool("echo", {"message": "ts"})
            async with agent(f"{gateway.base}{WORKSPACE}", admin.raw_key, mode="2026-07-28") as client:
                summed = await client.call_tool(f"{server.prefix}__get-sum", {"a": 2, "b": 3})
            return sorted(t.name for t in listed.tools), echoed, summed

        names, echoed, summed = asyncio.run(scenario())
        wait_for(lambda: len(bridge._held) <= 1)
    assert server.transport_found == "sse" and server.status == "healthy"
    assert names == ["echo", "get-sum"]  # the other tools wait for approval: not shown
    assert echoed.content[0].text == "Echo: ts"
    assert "5" in summed.content[0].text


def test_mcp_inspector_v2_lists_and_calls_an_sse_servers_tools_through_the_bridge(admin, flag_on, gateway):
    with mcp_peers.sse_peer() as peer:
        server = register(admin, peer, name="legacy")
        listed = inspect(proxy_url(gateway, server), admin.raw_key, "--method", "tools/list")
        called = inspect(proxy_url(gateway, server), admin.raw_key, "--method", "tools/call", "--tool-name", "echo",
                         "--tool-arg", "text=inspected")
        via_workspace = inspect(f"{gateway.base}{WORKSPACE}", admin.raw_key, "--method", "tools/call",
                                "--tool-name", "legacy__echo", "--tool-arg", "text=aggregated")
    assert {"echo", "count"} <= {tool["name"] for tool in listed["tools"]}, listed
    assert called["content"][0]["text"] == "inspected", called
    assert via_workspace["content"][0]["text"] == "aggregated", via_workspace
