"""The proxy end to end: SDK clients → live gateway → SDK upstreams, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
import redis as redis_lib

from external_mcp import catalog, health, services
from external_mcp.models import ExternalMcpServer
from tests import mcp_peers
from tests.gateway import agent, count_with_progress, proxy_url, register
from twinmcp import services as core_services
from twinmcp.jsonlog import JsonFormatter
from usage.models import UsageEvent
from usage.signals import external_mcp_usage_event

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("midday", "proxy_settings")]

ACCEPT = "application/json, text/event-stream"


async def post(url: str, key: str | None, body: dict | list, **headers: str) -> tuple[int, Any, bytes]:
    request_headers = {"Content-Type": "application/json", "Accept": ACCEPT, **headers}
    if key:
        request_headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session, session.post(url, data=json.dumps(body),
                                                               headers=request_headers) as response:
        return response.status, response.headers.copy(), await response.read()


PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


def wait_for(condition, timeout: float = 30.0) -> None:
    """Until ``condition()`` holds; the deadline is only ever reached when the code is broken."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        time.sleep(0.05)


def call(name: str, arguments: dict | None = None, request_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments or {}}}


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_sdk_client_lists_calls_and_gets_progress_through_the_proxy(admin, flag_on, gateway, mode):
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, approve=False)
        catalog.tools_approve(server=server, actor=admin.user, names=["echo", "count"])

        async def scenario():
            async with agent(proxy_url(gateway, server), admin.raw_key, mode=mode) as client:
                tools = await client.list_tools()
                echoed = await client.call_tool("echo", {"text": "hi"})
                counted, progress = await count_with_progress(client, "count", 3)
                return sorted(t.name for t in tools.tools), echoed, counted, progress

        names, echoed, counted, progress = asyncio.run(scenario())
        upstream_auth = [r.headers.get("authorization") for r in peer.requests]
    assert names == ["count", "echo"]  # add is not approved: filtered out
    assert echoed.content[0].text == "hi"
    assert "counted to 3" in counted.content[0].text
    assert progress == [1, 2, 3]
    assert admin.raw_key not in str(upstream_auth)
    events = UsageEvent.objects.filter(server_id=server.pk)
    # An SDK client returns on the result event, a moment before the stream's last byte, which
    # the proxy sends after committing the event: wait for that commit.
    wait_for(lambda: events.filter(method="tools/call").count() >= 2)
    assert events.filter(method="tools/call", outcome="ok", counted=True).count() == 2
    assert set(events.filter(method="tools/call").values_list("tool_name", flat=True)) == {"echo", "count"}


def test_unapproved_and_changed_tools_are_refused_without_contacting_upstream(admin, flag_on, gateway):
    with mcp_peers.mutable_peer() as peer:
        server = register(admin, peer, approve=False)
        catalog.tools_approve(server=server, actor=admin.user, names=["echo"])
        url = proxy_url(gateway, server)
        peer.clear_requests()
        status, _, body = asyncio.run(post(url, admin.raw_key, call("add", {"a": 1, "b": 2}, 7)))
        assert status == 200
        error = json.loads(body)
        assert error["id"] == 7 and "pending approval" in error["error"]["message"]
        assert peer.requests == []
        peer.set_tool_description("echo", "changed behind our back")
        health.check_now(ExternalMcpServer.objects.get(pk=server.pk))
        peer.clear_requests()
        status, _, body = asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))
        assert "quarantined" in json.loads(body)["error"]["message"]
        status, _, body = asyncio.run(post(url, admin.raw_key, call("nope")))
        assert "not in" in json.loads(body)["error"]["message"]
        assert peer.requests == []
    assert UsageEvent.objects.filter(outcome="blocked", counted=False).count() == 3


def test_agent_credentials_never_reach_upstream_and_stored_ones_do(admin, flag_on, gateway):
    with mcp_peers.bearer_peer("upstream-secret", json_response=True) as peer:
        server = register(admin, peer, auth_type="bearer", credentials={"token": "upstream-secret"})
        peer.clear_requests()
        status, headers, _ = asyncio.run(post(
            proxy_url(gateway, server), admin.raw_key,
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"}}},
            Cookie="sessionid=abc", Origin="http://127.0.0.1", **{"X-Custom": "drop-me", "Mcp-Param-Region": "eu"}))
        assert status == 200 and headers.get("Mcp-Session-Id")
        sent = peer.requests[-1].headers
    assert sent["authorization"] == "Bearer upstream-secret"
    assert "cookie" not in sent and "origin" not in sent and "x-custom" not in sent
    assert sent["mcp-param-region"] == "eu"
    assert sent["host"].startswith("127.0.0.1:")


def test_upstream_cookies_reach_neither_the_agent_nor_later_requests(admin, flag_on, gateway):
    """One upstream connection pool serves every agent: a cookie kept for one must not be sent
    for another."""
    with mcp_peers.cookie_peer() as peer:
        server = register(admin, peer)
        server.base_url = peer.url.replace("127.0.0.1", "localhost")
        server.save(update_fields=["base_url"])
        url = proxy_url(gateway, server)
        peer.clear_requests()
        for i in range(2):
            status, headers, _ = asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"}, i)))
            assert status == 200 and "Set-Cookie" not in headers
        assert [r.response_headers.get("set-cookie") for r in peer.requests] == ["upstream_sticky=node-1; Path=/"] * 2
        assert all("cookie" not in r.headers for r in peer.requests)


def test_authentication_and_tenancy_errors(admin, outsider, flag_on, gateway):
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)
        body = call("echo", {"text": "x"})
        status, headers, raw = asyncio.run(post(url, None, body))
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(raw)["error"]["code"] == -32001
        assert asyncio.run(post(url, "tmcp_" + "x" * 43, body))[0] == 401
        assert asyncio.run(post(url, outsider.raw_key, body))[0] == 404
        other = url.replace(str(server.pk), "00000000-0000-0000-0000-000000000000")
        assert asyncio.run(post(other, admin.raw_key, body))[0] == 404
        services.server_update(server=server, actor=admin.user, enabled=False)
        status, _, raw = asyncio.run(post(url, admin.raw_key, body))
        assert status == 503 and "disabled" in json.loads(raw)["error"]["message"]


def test_flag_off_is_404(admin, gateway, db):
    with mcp_peers.stateless_peer() as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="x", base_url=peer.url)
        assert asyncio.run(post(proxy_url(gateway, server), admin.raw_key, call("echo")))[0] == 404


def test_foreign_host_and_origin_are_refused(admin, flag_on, gateway):
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)
        assert asyncio.run(post(url, admin.raw_key, call("echo"), Host="evil.example"))[0] == 421
        assert asyncio.run(post(url, admin.raw_key, call("echo"), Origin="http://evil.example"))[0] == 403


def test_quota_allows_exactly_the_limit_then_429(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 3
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)
        results = [asyncio.run(post(url, admin.raw_key, call("echo", {"text": str(i)}, i))) for i in range(4)]
        upstream_calls = len(peer.requests_to(rpc_method="tools/call"))
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert results[2][1]["RateLimit-Remaining"] == "0" and results[0][1]["RateLimit-Limit"] == "3"
    status, headers, raw = results[3]
    error = json.loads(raw)
    assert error["id"] == 3
    data = error["error"]["data"]
    assert data["limit"] == 3 and data["remaining"] == 0 and data["plan"] == "free"
    assert data["reset_at"].endswith("T00:00:00Z")
    assert data["upgrade_url"] == "http://127.0.0.1:8000/billing/"  # absolute: agents have no base URL
    assert int(headers["Retry-After"]) > 0 and headers["RateLimit-Remaining"] == "0"
    assert upstream_calls == 3
    assert UsageEvent.objects.filter(outcome="quota", counted=False).count() == 1


def test_pro_plan_is_not_capped(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 1
    core_services.profile_set_plan(user=admin.user, code="pro")
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        assert [asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))[0] for _ in range(3)] == [200] * 3


def test_quota_is_exact_under_concurrency_through_the_proxy(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 200
    from usage.limiter import get_limiter

    get_limiter().consume(admin.user.pk, 200, 195)
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))

        async def burst():
            calls = (post(url, admin.raw_key, call("echo", {"text": "x"}, i)) for i in range(50))
            return await asyncio.gather(*calls)

        statuses = [r[0] for r in asyncio.run(burst())]
    assert statuses.count(200) == 5 and statuses.count(429) == 45


def test_sdk_client_surfaces_a_readable_quota_error(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 1
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))

        async def scenario():
            async with agent(url, admin.raw_key, mode="2026-07-28") as client:
                await client.call_tool("echo", {"text": "1"})
                await client.call_tool("echo", {"text": "2"})

        with pytest.raises(BaseException) as excinfo:
            asyncio.run(scenario())
    assert "Daily limit of 1 tool calls reached" in repr(excinfo.value)


def test_every_request_is_recorded(admin, flag_on, gateway):
    published: list[dict] = []

    def receiver(sender, events, **kwargs):
        published.extend(events)

    external_mcp_usage_event.connect(receiver, weak=False)
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))

        async def load():
            await asyncio.gather(*(post(url, admin.raw_key, call("echo", {"text": "x" * i}, i)) for i in range(60)))

        asyncio.run(load())
    events = UsageEvent.objects.filter(method="tools/call")
    assert events.count() == 60
    assert set(events.values_list("outcome", flat=True)) == {"ok"}
    event = events.order_by("-bytes_in").first()
    assert event.tokens_in > 0 and event.tokens_out > 0 and event.latency_ms > 0 and event.upstream_status == 200
    assert event.user_id == admin.user.pk and event.api_key_id == admin.key.pk and event.request_id
    external_mcp_usage_event.disconnect(receiver)
    assert len([e for e in published if e["method"] == "tools/call"]) == 60


def test_a_json_answer_in_many_chunks_arrives_whole_and_is_recorded_first(admin, flag_on, gateway):
    text = "".join(f"{i:07d}" for i in range(60_000))  # 420 kB: many socket reads on both hops
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        status, headers, raw = asyncio.run(post(url, admin.raw_key, call("echo", {"text": text})))
        # No waiting: the event is committed before the answer's last byte.
        event = UsageEvent.objects.get(method="tools/call")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["result"]["content"][0]["text"] == text
    assert event.outcome == "ok" and event.bytes_out == len(raw)


def test_client_disconnect_mid_stream_is_recorded(admin, flag_on, gateway):
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)

        async def scenario():
            async with agent(url, admin.raw_key, mode="2026-07-28") as client:
                task = asyncio.ensure_future(client.call_tool("slow_echo", {"text": "x", "delay_ms": 3_600_000}))
                await peer.wait_for_request(lambda r: r.rpc_method == "tools/call")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(scenario())
        wait_for(lambda: UsageEvent.objects.filter(tool_name="slow_echo").exists())
    event = UsageEvent.objects.get(tool_name="slow_echo")
    assert event.outcome == "client_disconnect"


@pytest.mark.parametrize(
    ("factory", "status", "phrase"),
    [
        (lambda: mcp_peers.garbage_peer("html"), 502, "content type"),
        (lambda: mcp_peers.status_peer(302), 502, "redirect"),
        (lambda: mcp_peers.bearer_peer("x"), 502, "stored credentials"),
    ],
)
def test_upstream_failures_become_json_rpc_errors(admin, flag_on, gateway, factory, status, phrase):
    with factory() as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="bad", base_url=peer.url)
        got, _, raw = asyncio.run(post(proxy_url(gateway, server), admin.raw_key, PING))
    assert got == status
    assert phrase in json.loads(raw)["error"]["message"]


def test_upstream_down_is_502_and_slow_is_504(admin, flag_on, gateway, settings):
    peer = mcp_peers.stateless_peer().start()
    server = register(admin, peer)
    peer.stop()
    status, _, raw = asyncio.run(post(proxy_url(gateway, server), admin.raw_key, call("echo", {"text": "x"})))
    assert status == 502 and "cannot connect" in json.loads(raw)["error"]["message"]
    settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS = 300
    with mcp_peers.slow_peer(3600) as slow:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="slow", base_url=slow.url)
        status, _, raw = asyncio.run(post(proxy_url(gateway, server), admin.raw_key, PING))
    assert status == 504
    assert set(UsageEvent.objects.values_list("outcome", flat=True)) >= {"upstream_error", "timeout"}


def test_name_rebound_to_a_refused_address_is_refused_at_connection(admin, flag_on, gateway, settings):
    with mcp_peers.stateless_peer() as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="rebound",
                                        base_url=peer.url.replace("127.0.0.1", "localhost"))
        settings.EXTERNAL_MCP_ALLOWED_NETWORKS = []
        status, _, raw = asyncio.run(post(proxy_url(gateway, server), admin.raw_key, PING))
        assert peer.requests == []
    assert status == 502 and "URL policy" in json.loads(raw)["error"]["message"]


def test_an_answer_over_the_cap_is_a_json_rpc_error_not_a_cut_body(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES = 2000
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        status, _, raw = asyncio.run(post(url, admin.raw_key, call("echo", {"text": "y" * 5000})))
    assert status == 502 and "larger than 2000 bytes" in json.loads(raw)["error"]["message"]
    event = UsageEvent.objects.get(method="tools/call")
    assert (event.outcome, event.counted) == ("upstream_error", False)


def test_bad_requests_are_4xx(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_PROXY_MAX_BODY_BYTES = 100
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))

        async def raw(data: bytes, method: str = "POST") -> int:
            async with aiohttp.ClientSession() as session, session.request(
                    method, url, data=data, headers={"Authorization": f"Bearer {admin.raw_key}",
                                                     "Content-Type": "application/json", "Accept": ACCEPT}) as r:
                return r.status

        assert asyncio.run(raw(b"{not json")) == 400
        assert asyncio.run(raw(b"[]")) == 400
        assert asyncio.run(raw(b"x" * 500)) == 413
        assert asyncio.run(raw(b"", "PUT")) == 405


def test_get_stream_and_delete_pass_through(admin, flag_on, gateway):
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)
        peer.clear_requests()
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}

        async def scenario():
            status, headers, _ = await post(url, admin.raw_key, init)
            session_id = headers["Mcp-Session-Id"]
            common = {"Authorization": f"Bearer {admin.raw_key}", "Mcp-Session-Id": session_id,
                      "MCP-Protocol-Version": "2025-11-25"}
            await post(url, admin.raw_key, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                       **{"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"})
            async with aiohttp.ClientSession() as session:
                async with session.get(url, headers={**common, "Accept": "text/event-stream"}) as stream:
                    stream_status = stream.status
                    stream_type = stream.headers.get("Content-Type")
                async with session.delete(url, headers=common) as deleted:
                    delete_status = deleted.status
                async with session.post(url, data=json.dumps(call("echo", {"text": "x"})),
                                        headers={**common, "Content-Type": "application/json", "Accept": ACCEPT}) as r:
                    after_delete = r.status
            return session_id, stream_status, stream_type, delete_status, after_delete

        session_id, stream_status, stream_type, delete_status, after_delete = asyncio.run(scenario())
        upstream_session_ids = {r.headers.get("mcp-session-id") for r in peer.requests if r.method != "POST"}
        assert {r.method for r in peer.requests} == {"POST", "GET", "DELETE"}
    assert stream_status == 200 and stream_type.startswith("text/event-stream")
    assert delete_status == 200 and after_delete == 404
    assert upstream_session_ids == {session_id}
    ids = dict(UsageEvent.objects.values_list("method", "jsonrpc_id"))
    assert {"GET", "DELETE", "initialize", "notifications/initialized"} <= set(ids)
    # Only a message with an id has one: a notification, a GET and a DELETE record none.
    assert [ids[m] for m in ("initialize", "notifications/initialized", "GET", "DELETE")] == ["1", "", "", ""]


def test_calls_the_upstream_never_served_are_refunded(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 2
    from usage.limiter import get_limiter

    with mcp_peers.default_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        # A stateful upstream refuses tools/call without a session (HTTP 400): not served, not charged.
        statuses = [asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"}, i)))[0] for i in range(4)]
    assert statuses == [400, 400, 400, 400]
    assert get_limiter().peek(admin.user.pk, 2).used == 0
    assert set(UsageEvent.objects.values_list("outcome", flat=True)) == {"error"}
    assert not UsageEvent.objects.filter(counted=True).exists()
    peer.stop()
    statuses = [asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"}, i)))[0] for i in range(3)]
    assert statuses == [502, 502, 502]
    assert get_limiter().peek(admin.user.pk, 2).used == 0


def test_logs_have_one_line_per_request_and_never_a_secret(admin, flag_on, gateway, caplog):
    caplog.set_level(logging.DEBUG)
    with mcp_peers.bearer_peer("canary-upstream-secret", json_response=True) as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="logged",
                                        base_url=peer.url, auth_type="bearer",
                                        credentials={"token": "canary-upstream-secret"})
        health.check_now(ExternalMcpServer.objects.get(pk=server.pk))
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        status, headers, _ = asyncio.run(post(proxy_url(gateway, server), admin.raw_key, init,
                                              **{"X-Request-Id": "trace-42"}))
    assert status == 200 and headers["X-Request-Id"] == "trace-42"
    lines = [r for r in caplog.records if getattr(r, "event", "") == "proxy_request"]
    assert len(lines) == 1
    line = lines[0]
    assert (line.request_id, line.method, line.outcome) == ("trace-42", "initialize", "ok")
    assert line.server == str(server.pk) and line.workspace == str(admin.workspace.pk)
    assert [r for r in caplog.records if getattr(r, "event", "") == "health_check"]
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records) + caplog.text
    assert "canary-upstream-secret" not in formatted
    assert admin.raw_key not in formatted


def test_a_revoked_key_stops_at_once_despite_the_cache(admin, flag_on, gateway, settings):
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 300
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        assert asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))[0] == 200
        core_services.api_key_revoke(key=admin.key)
        status, _, body = asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))
    assert status == 401 and "revoked" in json.loads(body)["error"]["message"]


def test_a_change_announced_by_another_process_reaches_the_gateway(admin, flag_on, gateway, settings, redis_url):
    """Another process (a Celery worker, another gateway host) quarantines a tool: its write
    does not touch this process's cache, its announcement on Redis does."""
    from external_mcp.models import ExternalMcpTool
    from twinmcp import invalidation

    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 300
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer)
        url = proxy_url(gateway, server)
        assert asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))[0] == 200
        ExternalMcpTool.objects.filter(server=server, name="echo").update(state="changed")

        def refused() -> bool:
            _, _, body = asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"}, 2)))
            return "quarantined" in json.loads(body).get("error", {}).get("message", "")

        assert not refused()  # still cached: nothing told this process yet
        redis_lib.Redis.from_url(redis_url).publish(invalidation.CHANNEL, b"flush")
        wait_for(refused)
        assert refused()


def test_the_python_configuration_shown_to_admins_lists_the_approved_tools(admin, flag_on, gateway):
    """The snippet on the server page, run as an admin would paste it, with a real key."""
    import subprocess
    import sys

    from external_mcp.agent_configs import agent_configs

    with mcp_peers.default_peer() as peer:
        server = register(admin, peer)
        configs = agent_configs(name=server.prefix, url=proxy_url(gateway, server), key=admin.raw_key)
        [python] = [config.text for config in configs if config.language == "python"]
        result = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == set(ExternalMcpServer.objects.get(pk=server.pk).tools.callable()
                                             .values_list("name", flat=True))
