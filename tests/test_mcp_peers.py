"""Proves each upstream in ``tests.mcp_peers`` behaves like the deployment it stands in for.

Health checks and the proxy are tested against these peers, so a peer that drifted (say, a
"bearer" upstream that stopped sending ``WWW-Authenticate``) would make those tests pass for
the wrong reason. Each test drives a peer with the official SDK client and/or raw aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx2
import mcp_types as types
import pytest
import trustme
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.shared.exceptions import MCPError

from tests.mcp_peers import (
    LOOPBACK,
    SERVER_CARD_MEDIA_TYPE,
    RunningPeer,
    api_key_peer,
    bearer_peer,
    default_peer,
    garbage_peer,
    handshake_only_peer,
    json_peer,
    mcp_peer,
    mtls_peer,
    mutable_peer,
    paginated_peer,
    running,
    serve_asgi,
    server_card_peer,
    slow_peer,
    stateless_peer,
    status_peer,
    tls_peer,
    untrusted_tls_peer,
)

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
ACCEPT_BOTH = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

E = TypeVar("E", bound=BaseException)


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """JSON-RPC messages in the body, whether it was one JSON document or an SSE stream."""
        if self.content_type.startswith("text/event-stream"):
            return parse_sse(self.body.decode())
        return [json.loads(self.body)] if self.body else []


def parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.split("\n") if line.startswith("data:"))
        if data:
            events.append(json.loads(data))
    return events


async def post(
    http: aiohttp.ClientSession,
    url: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with http.post(url, data=body, headers={**ACCEPT_BOTH, **(headers or {})}, **kwargs) as response:
        return Reply(response.status, dict(response.headers), await response.read())


def initialize(request_id: int = 1) -> dict[str, Any]:
    params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": params}


def modern(method: str, params: dict[str, Any] | None = None, request_id: int = 1) -> tuple[dict[str, Any], dict]:
    """A 2026-07-28 request as the SDK client puts it on the wire: envelope in _meta, routing in headers."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**(params or {}), "_meta": meta}}
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if method == "tools/call" and params:
        headers["Mcp-Name"] = params["name"]
    return body, headers


async def open_session(http: aiohttp.ClientSession, url: str) -> str:
    """A raw handshake, so later raw requests can ride a real session."""
    reply = await post(http, url, initialize())
    assert reply.status == 200, reply
    session_id = reply.headers["mcp-session-id"]
    headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE}
    note = await post(http, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    assert note.status == 202
    return session_id


def find(exc: BaseException, kind: type[E]) -> E | None:
    """The SDK client surfaces failures wrapped in (nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if (found := find(sub, kind)) is not None:
                return found
    return None


async def sdk_failure(peer: RunningPeer, **kwargs: Any) -> Exception:
    try:
        async with peer.sdk_client(**kwargs) as client:
            await client.list_tools()
    except Exception as exc:
        return exc
    raise AssertionError(f"the SDK client unexpectedly worked against {peer}")


async def tool_names(client: Client) -> list[str]:
    return [tool.name for tool in (await client.list_tools(cache_mode="refresh")).tools]


async def until(condition: Callable[[], object], timeout: float = 30) -> None:
    """Wait for something another thread (a peer's loop) makes true; the deadline is only for a broken peer."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still false after {timeout} s"
        await asyncio.sleep(0.01)


def text_of(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


# -- plumbing: loopback, sync use, lifecycle ------------------------------------------------


def test_peer_binds_only_127_0_0_1_and_is_usable_from_a_sync_test() -> None:
    with default_peer() as peer:
        assert peer.url == f"http://127.0.0.1:{peer.port}/mcp"
        assert peer.base == f"http://127.0.0.1:{peer.port}"
        # Linux routes all of 127/8 to lo: a wildcard bind would accept on 127.0.0.2 too.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", peer.port), timeout=1):
            pass

        async def names() -> list[str]:
            async with Client(peer.url, mode="legacy") as client:
                return await tool_names(client)

        assert asyncio.run(names()) == ["echo", "add", "count", "slow_echo"]
        assert peer.requests[0].method == "POST" and peer.requests[0].rpc_method == "initialize"
    assert not peer.is_running


def test_many_peers_run_side_by_side_and_leave_no_threads_or_listeners() -> None:
    before = {t.name for t in threading.enumerate()}
    with running(default_peer(), json_peer(), stateless_peer(), paginated_peer(), mutable_peer()) as peers:
        ports = {peer.port for peer in peers}
        assert len(ports) == len(peers)
        assert all(peer.is_running for peer in peers)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leftover if name.startswith("mcp-peer-")]
    for port in ports:
        with pytest.raises(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            pass


async def test_serve_asgi_runs_any_app_with_uvicorn_tls_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_pem, client_pem, ca_pem = tmp_path / "server.pem", tmp_path / "client.pem", tmp_path / "ca.pem"
    ca.issue_cert(LOOPBACK).private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.issue_cert("client@example.com").private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    ca.cert_pem.write_to_path(str(ca_pem))

    async def hello(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"hello"})

    options = {
        "ssl_certfile": str(server_pem),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(ca_pem),
        "lifespan": "off",
    }
    async with serve_asgi(hello, uvicorn_options=options) as peer, aiohttp.ClientSession() as http:
        assert peer.base.startswith("https://127.0.0.1:")
        client_ctx = ssl.create_default_context(cafile=str(ca_pem))
        client_ctx.load_cert_chain(str(client_pem))
        async with http.get(f"{peer.base}/anything", ssl=client_ctx) as response:
            assert await response.text() == "hello"
        with pytest.raises(aiohttp.ClientError):
            async with http.get(peer.base, ssl=ssl.create_default_context(cafile=str(ca_pem))):
                pass
        assert peer.requests[0].path == "/anything"


def test_a_stopped_peer_keeps_its_port_from_everyone_else() -> None:
    peer = default_peer().start()
    port = peer.port
    peer.stop()
    with pytest.raises(OSError), socket.create_connection((LOOPBACK, port), timeout=30):
        pass
    squatter = socket.socket()
    with squatter, pytest.raises(OSError):  # what a server without SO_REUSEADDR would do
        squatter.bind((LOOPBACK, port))
    peer.start()
    assert peer.port == port
    peer.stop()


async def test_stop_and_restart_on_the_same_port_loses_sessions_like_a_real_restart() -> None:
    async with default_peer() as peer, aiohttp.ClientSession() as http:
        port = peer.port
        session_id = await open_session(http, peer.url)
        await peer.astop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, peer.url, initialize())
        await peer.astart()
        assert peer.port == port
        stale = await post(http, peer.url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                           {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE})
        assert stale.status == 404  # the SDK's answer for an unknown session: the client must re-initialize
        async with Client(peer.url, mode="legacy") as client:
            assert "echo" in await tool_names(client)


async def test_stopping_with_an_open_sdk_stream_ends_it_instead_of_waiting_it_out() -> None:
    # With a grace period no test outlives, only the drain can end the standing stream in time.
    patient = {"timeout_graceful_shutdown": 3600}
    peer = await mcp_peer(uvicorn_options=patient).astart()
    async with Client(peer.url, mode="legacy") as client:
        await client.list_tools()
        stream = await peer.wait_for_request(lambda r: r.method == "GET" and r.status == 200)
        await peer.astop()
    assert not peer.stop_was_forced
    assert not peer.is_running and stream.status == 200


# -- default peer: both protocol eras -------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", MODERN, "auto"])
async def test_default_peer_serves_the_sdk_client_in_every_mode(mode: str) -> None:
    async with default_peer() as peer, Client(peer.url, mode=mode) as client:
        assert client.protocol_version == (HANDSHAKE if mode == "legacy" else MODERN)
        assert await tool_names(client) == ["echo", "add", "count", "slow_echo"]
        assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"
        assert (await client.call_tool("add", {"a": 2, "b": 3})).structured_content == {"result": 5}
        assert text_of(await client.call_tool("slow_echo", {"text": "later", "delay_ms": 20})) == "later"

    calls = peer.requests_to(rpc_method="tools/call")
    assert len(calls) == 3
    if mode == "legacy":
        assert peer.requests[0].rpc_method == "initialize"
        assert all(r.headers["mcp-protocol-version"] == HANDSHAKE and "mcp-session-id" in r.headers for r in calls)
    else:
        # The stateless era: no session at all, routing duplicated into headers, envelope in _meta.
        assert all("mcp-session-id" not in r.headers for r in peer.requests)
        assert [r.headers["mcp-name"] for r in calls] == ["echo", "add", "slow_echo"]
        assert all(r.headers["mcp-method"] == "tools/call" for r in calls)
        assert calls[0].json()["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == MODERN
        assert (peer.requests[0].rpc_method == "server/discover") == (mode == "auto")


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_count_progress_reaches_the_sdk_progress_callback(mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with default_peer() as peer, Client(peer.url, mode=mode) as client:
        result = await client.call_tool("count", {"n": 4}, progress_callback=on_progress)
    assert text_of(result) == "counted to 4"
    assert [p for p, _, _ in seen] == [1, 2, 3, 4]
    assert seen[0] == (1, 4, "step 1 of 4")


async def test_count_progress_is_sse_events_before_the_result_on_the_wire() -> None:
    async with default_peer() as peer, aiohttp.ClientSession() as http:
        body, headers = modern("tools/call", {"name": "count", "arguments": {"n": 3}})
        body["params"]["_meta"]["progressToken"] = "tok"
        reply = await post(http, peer.url, body, headers)
        assert reply.status == 200 and reply.content_type.startswith("text/event-stream")
        methods = [m.get("method", "result" if "result" in m else "?") for m in reply.messages]
        assert methods == ["notifications/progress"] * 3 + ["result"]
        assert [m["params"]["progress"] for m in reply.messages[:3]] == [1, 2, 3]

        session_id = await open_session(http, peer.url)
        call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                "params": {"name": "count", "arguments": {"n": 2}, "_meta": {"progressToken": 9}}}
        legacy = await post(http, peer.url, call, {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE})
        assert [m.get("method") for m in legacy.messages] == ["notifications/progress"] * 2 + [None]
        assert legacy.messages[-1]["result"]["content"][0]["text"] == "counted to 2"


async def test_sdk_status_codes_for_broken_requests() -> None:
    """The wire contract a proxy in front of an SDK upstream must expect."""
    async with default_peer() as peer, aiohttp.ClientSession() as http:
        tools_list = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        unknown = await post(http, peer.url, tools_list, {"Mcp-Session-Id": "nope"})
        assert unknown.status == 404 and unknown.messages[0]["error"]["message"] == "Session not found"
        missing = await post(http, peer.url, tools_list)
        assert missing.status == 400 and "Missing session ID" in missing.messages[0]["error"]["message"]
        json_only = await post(http, peer.url, initialize(), {"Accept": "application/json"})
        assert json_only.status == 406
        rebinding = await post(http, peer.url, initialize(), {"Host": "evil.example"})
        assert rebinding.status == 421
        body, headers = modern("tools/list")
        mismatch = await post(http, peer.url, body, {**headers, "Mcp-Method": "tools/call"})
        assert mismatch.status == 400 and mismatch.messages[0]["error"]["code"] == -32020
        no_such_tool_method = await post(http, peer.url, *modern("no/such/method"))
        assert no_such_tool_method.status == 404 and no_such_tool_method.messages[0]["error"]["code"] == -32601
        async with http.get(peer.url, headers={"Accept": "text/event-stream"}) as get:
            assert get.status == 400  # a standing GET stream needs a session


# -- response modes ---------------------------------------------------------------------------


async def test_json_peer_answers_with_single_json_bodies() -> None:
    async with json_peer() as peer, aiohttp.ClientSession() as http:
        reply = await post(http, peer.url, initialize(), {"Accept": "application/json"})
        assert reply.status == 200 and reply.content_type == "application/json"
        assert "mcp-session-id" in reply.headers
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        async with Client(peer.url, mode="legacy") as client:
            result = await client.call_tool("count", {"n": 2}, progress_callback=on_progress)
        assert text_of(result) == "counted to 2"
        assert seen == []  # a JSON answer has nowhere to put notifications: progress is dropped


async def test_stateless_peer_needs_no_session() -> None:
    async with stateless_peer() as peer, aiohttp.ClientSession() as http:
        init = await post(http, peer.url, initialize())
        assert init.status == 200 and "mcp-session-id" not in init.headers
        assert init.content_type == "application/json"
        listed = await post(http, peer.url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert listed.status == 200
        assert [t["name"] for t in listed.messages[0]["result"]["tools"]] == ["echo", "add", "count", "slow_echo"]
        for mode in ("legacy", MODERN):
            async with Client(peer.url, mode=mode) as client:
                assert text_of(await client.call_tool("echo", {"text": mode})) == mode


# -- handshake-era only ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rejection", "status", "code"),
    [("missing_session", 400, -32600), ("unsupported_version", 400, -32600), ("method_not_found", 200, -32601)],
)
async def test_handshake_only_peer_refuses_the_2026_era_like_an_old_server(
    rejection: str, status: int, code: int
) -> None:
    async with handshake_only_peer(rejection=rejection) as peer, aiohttp.ClientSession() as http:  # type: ignore[arg-type]
        reply = await post(http, peer.url, *modern("server/discover"))
        assert (reply.status, reply.messages[0]["error"]["code"]) == (status, code)
        listed = await post(http, peer.url, *modern("tools/list"))
        assert listed.status == 400

        async with Client(peer.url, mode="auto") as client:
            assert client.protocol_version == HANDSHAKE  # the probe failed, the handshake fallback worked
            assert "echo" in await tool_names(client)
        assert find(await sdk_failure(peer, mode=MODERN), MCPError) is not None


async def test_handshake_only_peer_answers_discover_inside_a_session_with_method_not_found() -> None:
    async with handshake_only_peer() as peer, aiohttp.ClientSession() as http:
        session_id = await open_session(http, peer.url)
        discover = {"jsonrpc": "2.0", "id": 7, "method": "server/discover"}
        reply = await post(http, peer.url, discover, {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE})
        assert reply.status == 200
        assert reply.messages[-1]["error"]["code"] == -32601


# -- authentication ---------------------------------------------------------------------------


async def test_bearer_peer_challenges_without_the_token_and_serves_with_it() -> None:
    async with bearer_peer("s3cret") as peer, aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            reply = await post(http, peer.url, initialize(), headers)
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
            assert f'resource_metadata="{peer.base}/.well-known/oauth-protected-resource/mcp"' in (
                reply.headers["WWW-Authenticate"]
            )
        async with http.get(f"{peer.base}/.well-known/oauth-protected-resource/mcp") as prm:
            assert (await prm.json())["resource"] == peer.url
        assert peer.requests[0].headers.get("authorization") is None
        assert peer.requests[1].headers["authorization"] == "Bearer wrong"

        peer.clear_requests()
        async with peer.sdk_client(mode="auto", headers={"Authorization": "Bearer s3cret"}) as client:
            assert "echo" in await tool_names(client)
        assert all(r.headers["authorization"] == "Bearer s3cret" for r in peer.requests_to())
        error = find(await sdk_failure(peer, mode="legacy"), MCPError)
        assert error is not None


async def test_api_key_peer_separates_missing_from_wrong_keys() -> None:
    async with api_key_peer("X-API-Key", "k-123") as peer, aiohttp.ClientSession() as http:
        assert (await post(http, peer.url, initialize())).status == 401
        assert (await post(http, peer.url, initialize(), {"X-API-Key": "nope"})).status == 403
        assert (await post(http, peer.url, initialize(), {"X-API-Key": "k-123"})).status == 200
        async with peer.sdk_client(headers={"X-API-Key": "k-123"}) as client:
            assert "add" in await tool_names(client)
        assert peer.requests[-1].headers["x-api-key"] == "k-123"


# -- TLS ----------------------------------------------------------------------------------------


async def test_mtls_peer_requires_a_client_certificate(tmp_path: Path) -> None:
    async with mtls_peer() as peer, aiohttp.ClientSession() as http:
        assert peer.url.startswith("https://127.0.0.1:")
        assert peer.ca is not None and peer.ca_pem and "BEGIN CERTIFICATE" in peer.ca_pem
        assert peer.client_cert_pem and "BEGIN CERTIFICATE" in peer.client_cert_pem
        assert peer.client_key_pem and "PRIVATE KEY" in peer.client_key_pem

        # What a consumer holding only the PEM strings (e.g. stored credentials) does.
        cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
        cert_file.write_text(peer.client_cert_pem)
        key_file.write_text(peer.client_key_pem)
        with_cert = ssl.create_default_context(cadata=peer.ca_pem)
        with_cert.load_cert_chain(cert_file, key_file)
        assert (await post(http, peer.url, initialize(), ssl=with_cert)).status == 200

        without_cert = ssl.create_default_context(cadata=peer.ca_pem)
        with pytest.raises(aiohttp.ClientError):
            await post(http, peer.url, initialize(), ssl=without_cert)

        async with peer.sdk_client(mode="auto") as client:
            assert "count" in await tool_names(client)
        assert find(await sdk_failure(peer, client_cert=False), httpx2.TransportError) is not None


async def test_tls_peer_serves_https_to_clients_that_trust_its_ca() -> None:
    async with tls_peer() as peer:
        assert peer.url.startswith("https://127.0.0.1:")
        async with peer.sdk_client(mode=MODERN) as client:
            assert "echo" in await tool_names(client)
        assert peer.requests[0].scheme == "https"
        assert find(await sdk_failure(peer, trust=False), httpx2.ConnectError) is not None


async def test_untrusted_tls_peer_fails_verification_unless_its_ca_is_trusted() -> None:
    async with untrusted_tls_peer() as peer, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await post(http, peer.url, initialize(), ssl=ssl.create_default_context())
        assert (await post(http, peer.url, initialize(), ssl=peer.client_ssl_context())).status == 200
        assert find(await sdk_failure(peer, trust=False), httpx2.ConnectError) is not None


async def test_expired_tls_peer_fails_even_when_its_ca_is_trusted() -> None:
    async with untrusted_tls_peer(expired=True) as peer, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match="expired"):
            await post(http, peer.url, initialize(), ssl=peer.client_ssl_context())


# -- slow, garbage, statuses -------------------------------------------------------------------


async def test_slow_peer_accepts_the_request_but_answers_late() -> None:
    async with slow_peer(3600) as peer, aiohttp.ClientSession() as http:
        waiting = asyncio.ensure_future(post(http, peer.url, initialize()))
        recorded = await peer.wait_for_request(lambda r: r.rpc_method == "initialize")
        assert recorded.status is None and not waiting.done()  # received in full, not answered

        peer.delay_s = 0  # takes effect for the next request
        assert (await post(http, peer.url, initialize(2))).status == 200
        assert recorded.status is None and not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


@pytest.mark.parametrize(
    ("kind", "content_type", "sdk_code"),
    [
        ("html", "text/html", types.INVALID_REQUEST),
        ("json_not_rpc", "application/json", types.PARSE_ERROR),
        ("invalid_json", "application/json", types.PARSE_ERROR),
        ("sse_garbage", "text/event-stream", types.PARSE_ERROR),
        ("empty", "", types.INVALID_REQUEST),
    ],
)
async def test_garbage_peer_answers_200_with_unusable_bodies(kind: str, content_type: str, sdk_code: int) -> None:
    async with garbage_peer(kind) as peer, aiohttp.ClientSession() as http:  # type: ignore[arg-type]
        reply = await post(http, peer.url, initialize())
        assert reply.status == 200 and reply.content_type.startswith(content_type)
        if kind == "json_not_rpc":
            assert "jsonrpc" not in json.loads(reply.body)
        if kind == "invalid_json":
            with pytest.raises(ValueError):
                json.loads(reply.body)
        error = find(await sdk_failure(peer), MCPError)
        assert error is not None and error.code == sdk_code


@pytest.mark.parametrize(
    ("status", "sdk_code"), [(500, types.INTERNAL_ERROR), (404, types.METHOD_NOT_FOUND), (302, None)]
)
async def test_status_peer_answers_everything_with_one_status(status: int, sdk_code: int | None) -> None:
    async with status_peer(status) as peer, aiohttp.ClientSession() as http:
        for method in ("GET", "POST", "DELETE"):
            async with http.request(method, peer.url, allow_redirects=False) as response:
                assert response.status == status
        error = find(await sdk_failure(peer), MCPError)
        assert error is not None
        if status == 302:
            assert response.headers["Location"] == "http://169.254.169.254/"
            assert "not followed" in error.error.message  # the SDK refuses to leave the origin
            assert all(r.headers["host"] == f"127.0.0.1:{peer.port}" for r in peer.requests)
        else:
            assert error.code == sdk_code


# -- mutable tool set -----------------------------------------------------------------------------


async def test_mutable_peer_announces_tool_changes_to_handshake_era_sessions() -> None:
    notices: list[IncomingMessage] = []

    async def on_message(message: IncomingMessage) -> None:
        notices.append(message)

    async with mutable_peer() as peer, Client(peer.url, mode="legacy", message_handler=on_message) as client:
        assert client.server_capabilities.tools is not None and client.server_capabilities.tools.list_changed
        await until(lambda: peer.listening_sessions == peer.known_sessions != [])
        peer.set_tool_description("echo", "Echo, revised.")
        await until(lambda: notices)
        assert isinstance(notices[0], types.ToolListChangedNotification)
        listed = {t.name: t.description for t in (await client.list_tools()).tools}
        assert listed["echo"] == "Echo, revised."

        peer.add_tool(lambda x: x * 2, name="double", description="Double x.")
        peer.remove_tool("add")
        assert await tool_names(client) == ["echo", "double"]
        assert text_of(await client.call_tool("double", {"x": 21})) == "42"


async def test_mutable_peer_announces_tool_changes_on_2026_listen_streams() -> None:
    async with mutable_peer() as peer, Client(peer.url, mode=MODERN) as client:
        assert "add" in await tool_names(client)
        async with client.listen(tools_list_changed=True) as subscription:
            peer.set_tool_description("add", "Adds, now with a different story.")
            event = await asyncio.wait_for(anext(aiter(subscription)), 30)
        assert type(event).__name__ == "ToolsListChanged"
        listed = {t.name: t.description for t in (await client.list_tools(cache_mode="refresh")).tools}
        assert listed["add"] == "Adds, now with a different story."


# -- pagination --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_paginated_peer_lists_120_tools_in_pages(mode: str) -> None:
    async with paginated_peer() as peer, Client(peer.url, mode=mode) as client:
        names: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await client.list_tools(cursor=cursor)
            pages += 1
            names += [tool.name for tool in page.tools]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert (pages, len(names), len(set(names))) == (3, 120, 120)
        assert text_of(await client.call_tool("tool_119", {"text": "x"})) == "tool_119:x"
        with pytest.raises(MCPError) as bad_cursor:
            await client.list_tools(cursor="not-a-cursor")
        assert bad_cursor.value.code == types.INVALID_PARAMS


# -- server card ----------------------------------------------------------------------------------------


async def test_server_card_peer_publishes_discovery_documents() -> None:
    card = {"name": "acme-tools", "version": "2.0.0"}
    async with server_card_peer(card) as peer, aiohttp.ClientSession() as http:
        async with http.get(f"{peer.url}/server-card") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == SERVER_CARD_MEDIA_TYPE
            assert await response.json(content_type=None) == card
        async with http.get(f"{peer.base}/.well-known/mcp/catalog.json") as response:
            assert (await response.json())["servers"][0]["url"] == peer.url
        async with Client(peer.url, mode="auto") as client:
            assert "echo" in await tool_names(client)
