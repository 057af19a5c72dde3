"""The MCP proxy: ``/api/v1/external-mcp/<server_id>/mcp`` as a raw ASGI app.

Django still owns every model, the admin and every other URL; this one path skips Django's
request machinery because on a 2-core machine the sync/async bridging alone costs more than
the whole budget (design.md §5). Per request: validate Host/Origin, authenticate the TwinMCP
key (cached), load the server (cached), refuse unapproved tools, take the quota (one Redis
EVALSHA), forward with the stored credentials over pooled aiohttp connections, stream the
answer back unbuffered, and record one usage event per JSON-RPC message with group commit
before the last byte is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils import timezone

from external_mcp import metrics, urlpolicy
from external_mcp.jsonrpc import error_body, messages_of, response_summary
from external_mcp.mcp_client import PolicyResolver
from external_mcp.proxy_cache import ApiKeyError, KeyInfo, ServerInfo, get_key, get_server, tool_refusal
from twinmcp import invalidation
from twinmcp.apikeys import parse_authorization
from usage.limiter import QuotaUnavailable, get_limiter
from usage.recorder import get_recorder
from usage.tokens import token_counter

logger = logging.getLogger("external_mcp.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PATH_RE = re.compile(r"^/api/v1/external-mcp/([0-9a-fA-F-]{36})/mcp/?$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FORWARD_HEADERS = {
    b"accept", b"content-type", b"mcp-session-id", b"mcp-protocol-version", b"last-event-id", b"mcp-method",
    b"mcp-name",
}
COPY_BACK = ("Content-Type", "Mcp-Session-Id")
LIST_CHANGED = b"notifications/tools/list_changed"
# Failures where the upstream provably did not run the call: its quota uses are refunded.
NOT_SERVED = {"dns", "tls", "policy", "connect", "auth", "redirect", "disabled", "credentials"}


class ProxyError(Exception):
    def __init__(self, status: int, code: int, message: str, *, outcome: str = "error", error_class: str = "",
                 headers: list[tuple[bytes, bytes]] | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.outcome, self.error_class = outcome, error_class
        self.headers = headers or []
        self.data = data


@dataclass
class Call:
    """One proxied HTTP request and what the usage events need to know about it."""

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key: KeyInfo | None = None
    server_id: Any = None
    server: ServerInfo | None = None
    body: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)
    counted: int = 0
    quota_backend: str = ""
    quota_ticket: str = ""
    admitted: bool = False
    status: int = 0
    upstream_status: int | None = None
    bytes_out: int = 0
    outcome: str = "ok"
    error_code: int | None = None
    refunded: bool = False
    latency_ms: float | None = None
    tail: bytearray = field(default_factory=bytearray)
    response_kind: str = ""


_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
_list_changed_sent: dict[Any, float] = {}


def upstream_session() -> aiohttp.ClientSession:
    """One pooled session per event loop; keep-alive shorter than uvicorn's 5 s so a pooled
    connection is never one the upstream already closed. It serves every agent, so it keeps no
    cookies: one set for an agent's call would be sent with everybody's."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(), limit=0, keepalive_timeout=4, ttl_dns_cache=10)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                        cookie_jar=aiohttp.DummyCookieJar(),
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))
        _sessions[loop] = session
    return session


def allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])


class McpProxy:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = headers_of(scope)
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        call = Call(method=scope["method"],
                    request_id=incoming_id if REQUEST_ID_RE.fullmatch(incoming_id) else uuid.uuid4().hex)
        try:
            await self.handle(call, scope, headers, receive, send)
        except ProxyError as exc:
            call.outcome = exc.outcome
            call.error_code = exc.code
            if exc.error_class and call.server_id:
                metrics.ERRORS.labels(str(call.server_id), "proxy", exc.error_class).inc()
            await self.finish_with_error(call, exc, send)

    # --- request checks ---------------------------------------------------------------------------------------

    def check_host(self, headers: dict[bytes, bytes]) -> None:
        """DNS-rebinding protection: the gateway answers only for its own names."""
        host = headers.get(b"host", b"").decode("latin-1")
        domain, _ = split_domain_port(host)
        if not domain or not validate_host(domain, allowed_hosts()):
            raise ProxyError(421, -32600, f"Host {host!r} is not served here.", outcome="error")
        origin = headers.get(b"origin")
        if origin is not None:
            origin_host = origin.decode("latin-1").split("://", 1)[-1]
            origin_domain, _ = split_domain_port(origin_host)
            if not origin_domain or not validate_host(origin_domain, allowed_hosts()):
                raise ProxyError(403, -32600, "Origin not allowed.", outcome="error")

    async def authenticate(self, call: Call, headers: dict[bytes, bytes]) -> KeyInfo:
        raw_header = headers.get(b"authorization")
        try:
            raw = parse_authorization(raw_header.decode("latin-1") if raw_header else None)
            return await get_key(raw)
        except ApiKeyError as exc:
            raise ProxyError(401, -32001, str(exc), outcome="error",
                             headers=[(b"www-authenticate", b'Bearer realm="twinmcp"')]) from None

    async def load_server(self, call: Call, key: KeyInfo) -> ServerInfo:
        server = await get_server(call.server_id, key.user_id)
        if server is None or server.workspace_id != key.workspace_id or not server.flag_on:
            raise ProxyError(404, -32002, "Unknown MCP server.", outcome="error")
        if server.disabled:
            raise ProxyError(503, -32003, f"The MCP server {server.name!r} is disabled by a workspace admin.",
                             outcome="upstream_error", error_class="disabled")
        if server.credential_error:
            raise ProxyError(502, -32004, f"TwinMCP cannot use the stored credentials of {server.name!r}: "
                             f"{server.credential_error}", outcome="upstream_error", error_class="credentials")
        return server

    async def read_body(self, receive: Receive) -> bytes:
        limit = settings.EXTERNAL_MCP_PROXY_MAX_BODY_BYTES
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProxyError(499, -32000, "Client disconnected.", outcome="client_disconnect")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, -32600, f"Request body larger than {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def govern(self, call: Call, server: ServerInfo) -> None:
        for message in call.messages:
            if message.get("method") != "tools/call":
                continue
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            refusal = tool_refusal(server, name) if isinstance(name, str) else "tools/call without a tool name."
            if refusal:
                raise ProxyError(200, -32602, refusal, outcome="blocked",
                                 data={"tool": name, "state": server.tool_states.get(name or "", "unknown")})

    async def take_quota(self, call: Call, key: KeyInfo) -> list[tuple[bytes, bytes]]:
        if not call.counted:
            return []
        try:
            decision = await get_limiter().aconsume(key.user_id, key.daily_limit, call.counted)
        except QuotaUnavailable as exc:
            retry = str(exc.retry_after).encode()
            raise ProxyError(503, -32005, f"The daily quota cannot be checked right now; try again in "
                             f"{exc.retry_after} s.", outcome="upstream_error", error_class="quota_unavailable",
                             headers=[(b"retry-after", retry)], data={"retry_after": exc.retry_after}) from None
        headers: list[tuple[bytes, bytes]] = []
        if decision.limit is not None:
            reset = str(decision.retry_after).encode()
            headers = [(b"ratelimit-limit", str(decision.limit).encode()),
                       (b"ratelimit-remaining", str(decision.remaining or 0).encode()),
                       (b"ratelimit-reset", reset)]
        if decision.allowed:
            call.admitted = True
            call.quota_backend, call.quota_ticket = decision.backend, decision.ticket
        else:
            metrics.QUOTA_REJECTIONS.labels(str(call.server_id)).inc()
            raise ProxyError(
                429, -32029,
                f"Daily limit of {decision.limit} tool calls reached for the {key.plan} plan; it resets at "
                f"{decision.reset_at:%H:%M} UTC.",
                outcome="quota", headers=[(b"retry-after", str(decision.retry_after).encode()), *headers],
                data={"limit": decision.limit, "remaining": 0, "used": decision.used,
                      "reset_at": decision.reset_at.isoformat().replace("+00:00", "Z"), "plan": key.plan,
                      "upgrade_url": settings.TWINMCP_UPGRADE_URL},
            )
        return headers

    # --- the request ------------------------------------------------------------------------------------------

    async def handle(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        self.check_host(headers)
        match = PATH_RE.match(scope["path"])
        if call.method not in ("POST", "GET", "DELETE"):
            raise ProxyError(405, -32600, f"Method {call.method} not allowed.",
                             headers=[(b"allow", b"GET, POST, DELETE")])
        key = call.key = await self.authenticate(call, headers)
        try:
            call.server_id = uuid.UUID(match.group(1)) if match else None
        except ValueError:
            call.server_id = None
        if call.server_id is None:
            raise ProxyError(404, -32002, "Unknown MCP server.")
        server = call.server = await self.load_server(call, key)
        if call.method == "POST":
            call.body = await self.read_body(receive)
            try:
                call.messages = messages_of(call.body)
            except ValueError as exc:
                raise ProxyError(400, -32700, f"Parse error: {exc}") from None
            counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
            call.counted = sum(1 for m in call.messages if m.get("method") in counted_methods and "id" in m)
            self.govern(call, server)
        extra = await self.take_quota(call, key)
        await self.forward(call, scope, headers, receive, send, extra)

    def upstream_headers(self, headers: dict[bytes, bytes], server: ServerInfo, call: Call) -> dict[str, str]:
        out = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers.items()
               if name in FORWARD_HEADERS or name.startswith(b"mcp-param-")}
        out.update(server.auth_headers)
        out["X-Request-Id"] = call.request_id
        return out

    async def forward(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send,
                      extra: list[tuple[bytes, bytes]]) -> None:
        server = call.server
        assert server is not None
        timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
        if call.method == "GET":
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=None)
        else:
            timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        request_headers = self.upstream_headers(headers, server, call)
        session = upstream_session()
        response = None
        for attempt in (1, 2):
            try:
                response = await session.request(
                    call.method, server.base_url, data=call.body or None, headers=request_headers,
                    ssl=server.ssl, allow_redirects=False, timeout=timeout,
                )
                break
            except aiohttp.ClientConnectorDNSError:
                raise ProxyError(502, -32010, f"{server.name}: the upstream host name does not resolve.",
                                 outcome="upstream_error", error_class="dns") from None
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError):
                raise ProxyError(502, -32011, f"{server.name}: TLS handshake with the upstream failed "
                                 "(invalid or untrusted certificate).", outcome="upstream_error",
                                 error_class="tls") from None
            except urlpolicy.UrlPolicyError as exc:
                raise ProxyError(502, -32012, f"{server.name}: refused by the URL policy: {exc}",
                                 outcome="upstream_error", error_class="policy") from None
            except aiohttp.ClientConnectorError:
                if attempt == 1:
                    continue  # nothing was sent: repeating is safe
                raise ProxyError(502, -32013, f"{server.name}: cannot connect to the upstream server.",
                                 outcome="upstream_error", error_class="connect") from None
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise ProxyError(504, -32014, f"{server.name}: the upstream did not answer within "
                                 f"{timeout_s:g} s.", outcome="timeout", error_class="timeout") from None
            except aiohttp.ClientError as exc:
                raise ProxyError(502, -32015, f"{server.name}: the upstream connection failed "
                                 f"({type(exc).__name__}).", outcome="upstream_error", error_class="connect") from None
        assert response is not None
        async with response:
            await self.relay(call, response, receive, send, extra)

    async def relay(self, call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send,
                    extra: list[tuple[bytes, bytes]]) -> None:
        server = call.server
        assert server is not None
        call.upstream_status = status = response.status
        content_type = response.headers.get("Content-Type", "")
        kind = content_type.split(";")[0].strip().lower()
        call.response_kind = kind
        if status in (401, 403):
            raise ProxyError(502, -32016, f"{server.name} refused TwinMCP's stored credentials "
                             f"(HTTP {status}); a workspace admin must rotate them.",
                             outcome="upstream_error", error_class="auth")
        if 300 <= status < 400:
            raise ProxyError(502, -32017, f"{server.name} answered with a redirect, which is not followed.",
                             outcome="upstream_error", error_class="redirect")
        has_body = status not in (202, 204) and call.method != "DELETE" and response.content_length != 0
        if has_body and status < 400 and kind not in ("application/json", "text/event-stream"):
            raise ProxyError(502, -32018, f"{server.name} answered with content type {kind or '(none)'!r}; "
                             "expected JSON or an event stream.", outcome="upstream_error", error_class="protocol")
        out_headers = [(b"x-request-id", call.request_id.encode())]
        for name in COPY_BACK:
            if name in response.headers:
                out_headers.append((name.lower().encode(), response.headers[name].encode("latin-1")))
        if kind == "text/event-stream":
            out_headers.append((b"cache-control", b"no-cache"))
        out_headers.extend(extra)
        if status >= 400:
            call.outcome = "error"
        if status >= 500:
            metrics.ERRORS.labels(str(server.id), "proxy", "http").inc()
        elif status >= 400:
            await self.refund(call)
        filter_tools = any(m.get("method") == "tools/list" and "id" in m for m in call.messages) and status == 200
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        call.status = status
        last = b""
        if kind == "text/event-stream":
            await self.stream(call, response, receive, send, filter_tools)
        else:
            last = await self.pass_body(call, response, send, filter_tools)
        await self.record(call)
        await send({"type": "http.response.body", "body": last, "more_body": False})
        self.after(call)

    async def pass_body(self, call: Call, response: aiohttp.ClientResponse, send: Send, filter_tools: bool) -> bytes:
        """Relay a JSON answer as it arrives, holding back its last chunk: the caller sends it
        with the end of the response once the event is committed (one write, not two)."""
        cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
        held = b""
        try:
            if filter_tools:
                body = await response.content.read(cap + 1)
                if len(body) > cap:
                    raise _TooLarge
                held = self.filter_tool_list(call, body)
                call.bytes_out = len(held)
                call.tail = bytearray(held)
                return held
            async for chunk in response.content.iter_any():
                call.bytes_out += len(chunk)
                if call.bytes_out > cap:
                    raise _TooLarge
                self.keep_tail(call, chunk)
                if held:
                    await send({"type": "http.response.body", "body": held, "more_body": True})
                held = chunk
        except _TooLarge:
            call.outcome = "upstream_error"
            metrics.ERRORS.labels(str(call.server_id), "proxy", "too_large").inc()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            call.outcome = "timeout"
        except aiohttp.ClientError:
            call.outcome = "upstream_error"
        return held

    async def stream(self, call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send,
                     filter_tools: bool) -> None:
        """Forward SSE events as they arrive; stop on client disconnect or an idle stream."""
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            pump = asyncio.ensure_future(self.pump(call, response, send, filter_tools))
            done, _ = await asyncio.wait({pump, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
                if not self.answered(call):
                    call.outcome = "client_disconnect"
            else:
                pump.result()
        finally:
            disconnect.cancel()

    async def pump(self, call: Call, response: aiohttp.ClientResponse, send: Send, filter_tools: bool) -> None:
        cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES if call.method == "POST" else None
        idle = settings.EXTERNAL_MCP_PROXY_STREAM_IDLE_SECONDS
        pending = b""
        try:
            while True:
                chunk = await asyncio.wait_for(response.content.readany(), timeout=idle)
                if not chunk:
                    break
                call.bytes_out += len(chunk)
                if cap is not None and call.bytes_out > cap:
                    call.outcome = "upstream_error"
                    metrics.ERRORS.labels(str(call.server_id), "proxy", "too_large").inc()
                    return
                if LIST_CHANGED in chunk:
                    self.list_changed(call)
                if filter_tools:
                    pending += chunk
                    events, pending = _split_events(pending)
                    if events:
                        out = b"".join(self.filter_event(call, event) for event in events)
                        self.keep_tail(call, out)
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    continue
                self.keep_tail(call, chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if pending:
                await send({"type": "http.response.body", "body": pending, "more_body": True})
        except TimeoutError:
            if call.method == "POST":
                call.outcome = "timeout"
        except aiohttp.ClientError:
            call.outcome = "upstream_error"

    @staticmethod
    def answered(call: Call) -> bool:
        """Whether every request's response was relayed (a client may leave right after it)."""
        ids = {_id_key(m["id"]) for m in call.messages if "id" in m and "method" in m}
        return bool(ids) and ids <= response_summary(bytes(call.tail), "text/event-stream").keys()

    # --- tools/list filtering -----------------------------------------------------------------------------------

    def filter_tool_list(self, call: Call, body: bytes) -> bytes:
        try:
            message = json.loads(body)
        except ValueError:
            return body
        return json.dumps(self.filter_message(call, message), separators=(",", ":")).encode()

    def filter_event(self, call: Call, event: bytes) -> bytes:
        if b'"tools"' not in event:
            return event
        lines = event.split(b"\n")
        data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
        try:
            message = json.loads(data)
        except ValueError:
            return event
        filtered = json.dumps(self.filter_message(call, message), separators=(",", ":")).encode()
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        return b"\n".join([*kept, b"data: " + filtered]) + b"\n\n"

    def filter_message(self, call: Call, message: Any) -> Any:
        """Only approved tools are visible to agents."""
        server = call.server
        list_ids = {m.get("id") for m in call.messages if m.get("method") == "tools/list"}
        if isinstance(message, list):
            return [self.filter_message(call, m) for m in message]
        if isinstance(message, dict) and message.get("id") in list_ids and isinstance(message.get("result"), dict):
            tools = message["result"].get("tools")
            if isinstance(tools, list) and server is not None:
                message["result"]["tools"] = [t for t in tools if isinstance(t, dict)
                                              and tool_refusal(server, str(t.get("name"))) is None]
        return message

    # --- bookkeeping --------------------------------------------------------------------------------------------

    @staticmethod
    def keep_tail(call: Call, chunk: bytes) -> None:
        """Keep the end of the answer: the JSON-RPC response is the last message of a stream."""
        call.tail += chunk
        if len(call.tail) > 262144:
            del call.tail[:-131072]

    def list_changed(self, call: Call) -> None:
        """The upstream says its tools changed: check it now rather than at the next sweep."""
        now = time.monotonic()
        if now - _list_changed_sent.get(call.server_id, 0) < 30:
            return
        _list_changed_sent[call.server_id] = now
        from external_mcp.tasks import check_server

        asyncio.get_running_loop().run_in_executor(None, _safe_delay, check_server, str(call.server_id))

    async def finish_with_error(self, call: Call, exc: ProxyError, send: Send) -> None:
        request_id = None
        if len(call.messages) == 1:
            request_id = call.messages[0].get("id")
        body = error_body(request_id, exc.code, exc.message, exc.data)
        headers = [(b"content-type", b"application/json"), (b"x-request-id", call.request_id.encode()),
                   *exc.headers]
        call.status = exc.status
        if exc.error_class in NOT_SERVED:
            await self.refund(call)
        if call.key is not None and call.server_id is not None:
            await self.record(call)
        if exc.status == 499:
            return
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.after(call)

    async def refund(self, call: Call) -> None:
        """The upstream refused or never received the call: its uses are given back."""
        if call.quota_backend and call.key is not None:
            await get_limiter().arefund(call.key.user_id, call.counted, backend=call.quota_backend,
                                        ticket=call.quota_ticket)
            call.quota_backend = ""
            call.refunded = True

    async def record(self, call: Call) -> None:
        """One usage event per JSON-RPC message (or one for a GET/DELETE), committed before
        the answer's last byte."""
        key = call.key
        if key is None or call.server_id is None:
            return
        latency_ms = call.latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
        counter = token_counter()
        summaries = response_summary(bytes(call.tail), call.response_kind) if call.tail else {}
        now = timezone.now()
        base = {
            "created_at": now, "user_id": key.user_id, "workspace_id": key.workspace_id,
            "server_id": call.server_id, "api_key_id": key.key_id, "request_id": call.request_id,
            "latency_ms": latency_ms, "upstream_status": call.upstream_status,
        }
        rows: list[dict[str, Any]] = []
        messages = call.messages or [{"method": call.method}]
        share_out = call.bytes_out // max(1, len(messages))
        counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
        for message in messages:
            method = str(message.get("method", call.method))[:100]
            params = message.get("params") if isinstance(message.get("params"), dict) else {}
            tool = params.get("name") if method == "tools/call" else ""
            jsonrpc_id = message.get("id")
            summary = summaries.get(_id_key(jsonrpc_id)) if jsonrpc_id is not None else None
            code = call.error_code if call.error_code is not None else (summary or {}).get("error_code")
            outcome = call.outcome
            if outcome == "ok" and (code is not None or call.status >= 400):
                outcome = "error"
            raw_in = call.body if len(messages) == 1 else json.dumps(message).encode()
            raw_out = (summary or {}).get("raw", b"")
            size_out = (summary or {}).get("bytes", share_out)
            rows.append({
                **base, "method": method, "tool_name": str(tool or "")[:200],
                "jsonrpc_id": "" if jsonrpc_id is None else str(jsonrpc_id)[:100],
                "tokens_in": counter.count(raw_in) if raw_in else 0,
                "tokens_out": counter.count(raw_out) if raw_out else (size_out + 3) // 4,
                "bytes_in": len(raw_in), "bytes_out": size_out, "jsonrpc_error_code": code, "outcome": outcome,
                "counted": (call.admitted and not call.refunded and method in counted_methods
                            and jsonrpc_id is not None),
            })
        for row in rows:
            await get_recorder().record(row)

    def after(self, call: Call) -> None:
        server_id = str(call.server_id) if call.server_id else "unknown"
        latency = call.latency_ms if call.latency_ms is not None else (time.perf_counter() - call.started) * 1000
        method = call.messages[0].get("method", call.method) if len(call.messages) == 1 else call.method
        metrics.REQUESTS.labels(server_id, str(method)[:40] if method in _METRIC_METHODS else "other",
                                call.outcome).inc()
        metrics.LATENCY.labels(server_id, "proxy").observe(latency / 1000)
        if logger.isEnabledFor(logging.INFO):
            tool = ""
            if len(call.messages) == 1 and isinstance(call.messages[0].get("params"), dict):
                tool = str(call.messages[0]["params"].get("name", ""))[:200] if method == "tools/call" else ""
            logger.info("proxied request", extra={
                "event": "proxy_request", "request_id": call.request_id, "server": server_id,
                "workspace": str(call.key.workspace_id) if call.key else "",
                "user": call.key.user_id if call.key else None, "method": method, "tool": tool,
                "outcome": call.outcome, "status": call.status, "latency_ms": round(latency, 2)})


_METRIC_METHODS = {"tools/call", "tools/list", "initialize", "server/discover", "notifications/initialized",
                   "resources/read", "resources/list", "prompts/get", "prompts/list", "ping", "GET", "DELETE",
                   "POST"}


class _TooLarge(Exception):
    pass


def _id_key(value: Any) -> str:
    return json.dumps(value)


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    normalised = buffer.replace(b"\r\n", b"\n")
    parts = normalised.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]], parts[-1]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _safe_delay(task: Any, *args: Any) -> None:
    try:
        task.delay(*args)
    except Exception:  # noqa: BLE001 - a hint is best effort; the sweep will find the change anyway
        logger.warning("could not queue a check after tools/list_changed")


proxy_app = McpProxy()


class Router:
    """Sends the MCP proxy path to the raw ASGI proxy and everything else to Django."""

    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and PATH_RE.match(scope["path"]):
            await proxy_app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await self.django_app(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        listener: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                listener = asyncio.ensure_future(invalidation.listen())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if listener is not None:
                    listener.cancel()
                    await asyncio.gather(listener, return_exceptions=True)
                loop = asyncio.get_running_loop()
                session = _sessions.pop(loop, None)
                if session is not None:
                    await session.close()
                await get_recorder().close()
                await send({"type": "lifespan.shutdown.complete"})
                return
