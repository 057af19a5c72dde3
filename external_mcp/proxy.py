"""The MCP proxy: ``/api/v1/external-mcp/<server_id>/mcp`` as a raw ASGI app.

Django still owns every model, the admin and every other URL; this one path skips Django's
request machinery because on a 2-core machine the sync/async bridging alone costs more than
the whole budget (design.md §5). Per request: validate Host/Origin, authenticate the TwinMCP
key (cached), load the server (cached), refuse unapproved tools, take the quota (one Redis
EVALSHA), forward with the stored credentials over pooled aiohttp connections, relay the
answer, and record one usage event per JSON-RPC message with group commit before the last byte
is sent.

The upstream is hostile input (design.md §9, ``answers.py``): a JSON answer is one message, read
whole (up to ``EXTERNAL_MCP_MAX_RESPONSE_BYTES``), parsed once, checked to answer every request
and filtered before anything is sent; an event stream is forwarded event by event as it arrives
and ends with a JSON-RPC error event for each request it left unanswered. Every request ends in
``settle``: whatever happened, its usage events are recorded, uses the agent got no answer for
are refunded, and one log line is written.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from mcp.shared.inbound import decode_header_value

from external_mcp import answers, metrics, sse, urlpolicy
from external_mcp.answers import InvalidAnswer, Reply, Screen
from external_mcp.jsonrpc import (
    InvalidMessage,
    dumps,
    error_body,
    error_response,
    id_key,
    is_request,
    messages_of,
)
from external_mcp.mcp_client import PolicyResolver
from external_mcp.proxy_cache import ApiKeyError, KeyInfo, ServerInfo, get_key, get_server, pinned, tool_refusal
from external_mcp.queue import queue_check
from twinmcp import invalidation
from twinmcp.apikeys import parse_authorization
from usage.limiter import QuotaDecision, QuotaUnavailable, get_limiter
from usage.models import Outcome
from usage.recorder import get_recorder
from usage.tokens import token_counter

logger = logging.getLogger("external_mcp.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREFIX_RE = re.compile(r"^/api/v1/external-mcp/[^/]+/mcp(?:/.*)?$", re.DOTALL)
PATH_RE = re.compile(r"^/api/v1/external-mcp/([0-9a-fA-F-]{36})/mcp/?$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SESSION_ID_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")
HEADER_VALUE_RE = re.compile(r"^[\x20-\x7e]{1,256}$")
FORWARD_HEADERS = {
    b"accept", b"content-type", b"mcp-session-id", b"mcp-protocol-version", b"last-event-id", b"mcp-method",
    b"mcp-name",
}
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
UNKNOWN_SERVER = "unknown"
"""The metric label of every request that names no server of the caller's workspace."""


class ProxyError(Exception):
    """Ends a request with a JSON-RPC error. ``message`` is for the agent (never an internal
    address); ``detail`` goes to the log line only."""

    def __init__(self, status: int, code: int, message: str, *, outcome: str = Outcome.ERROR,
                 error_class: str = "", headers: list[tuple[bytes, bytes]] | None = None,
                 data: dict[str, Any] | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.outcome, self.error_class, self.detail = outcome, error_class, detail
        self.headers = headers or []
        self.data = data


def _upstream(server: ServerInfo, status: int, code: int, what: str, error_class: str, *,
              outcome: str = Outcome.UPSTREAM_ERROR, detail: str = "") -> ProxyError:
    return ProxyError(status, code, f"{server.name}: {what}", outcome=outcome, error_class=error_class,
                      detail=detail)


def timed_out(server: ServerInfo, seconds: float) -> ProxyError:
    return _upstream(server, 504, -32014, f"the upstream did not answer within {seconds:g} s.", "timeout",
                     outcome=Outcome.TIMEOUT)


def truncated(server: ServerInfo, exc: BaseException) -> ProxyError:
    return _upstream(server, 502, -32019, "the upstream closed the connection before its answer was complete.",
                     "truncated", detail=str(exc))


def too_large(server: ServerInfo) -> ProxyError:
    cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
    return _upstream(server, 502, -32021, f"the upstream's answer is larger than {cap} bytes.", "too_large")


def invalid_answer(server: ServerInfo, reason: str) -> ProxyError:
    return _upstream(server, 502, -32022, f"the upstream's answer {reason}.", "invalid_answer")


def unanswered(server: ServerInfo, problem: str) -> ProxyError:
    detail = f" ({problem})" if problem else ""
    return _upstream(server, 502, -32023,
                     f"the upstream's event stream ended without a response to this request{detail}.", "unanswered")


def connection_failed(server: ServerInfo, exc: BaseException) -> ProxyError:
    return _upstream(server, 502, -32015, f"the upstream connection failed ({type(exc).__name__}).", "connect",
                     detail=str(exc))


@dataclass
class Call:
    """One proxied HTTP request and what the usage events need to know about it."""

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key: KeyInfo | None = None
    server: ServerInfo | None = None
    """Set only once the server is known to be the caller's: nothing else is recorded or labelled."""
    body: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)
    batch: bool = False
    counted: int = 0
    quota: QuotaDecision | None = None
    """The quota's admission of this request's counted uses: only then are its events counted."""
    refunded: set[int] = field(default_factory=set)
    """Indexes in ``messages`` of the counted uses given back."""
    screen: Screen | None = None
    status: int = 0
    upstream_status: int | None = None
    bytes_out: int = 0
    outcome: str = Outcome.OK
    error_code: int | None = None
    failure: ProxyError | None = None
    latency_ms: float | None = None
    response_started: bool = False
    streaming: bool = False
    reply_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reply: bytes = b""
    """What ``settle`` sends last: a whole JSON answer, or the end of an event stream."""


_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
_checks_queued: dict[Any, float] = {}


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


def server_label(call: Call) -> str:
    """A server's id is a metric label only once it is known to exist in the caller's workspace:
    random or foreign ids share one label, so label sets stay bounded by the registered servers."""
    return str(call.server.id) if call.server is not None else UNKNOWN_SERVER


def approved_by(server: ServerInfo) -> Callable[[dict[str, Any]], bool]:
    """What of a tools list agents may see: approved tools, each exactly as it was approved. An
    approved name with another definition is hidden, and the server checked at once."""

    def allowed(tool: dict[str, Any]) -> bool:
        name = tool.get("name")
        if not isinstance(name, str) or tool_refusal(server, name) is not None:
            return False
        if pinned(server, tool):
            return True
        logger.warning("tool %r of server %s: agents were sent a definition other than the approved one; hidden",
                       name[:200], server.id)
        check_soon(server.id)
        return False

    return allowed


def check_soon(server_id: Any) -> None:
    """The upstream's tools changed, by its own word or by what it sent: check it now rather than
    at the next sweep (at most every 30 s per server and process)."""
    now = time.monotonic()
    if now - _checks_queued.get(server_id, 0) < 30:
        return
    _checks_queued[server_id] = now
    asyncio.get_running_loop().run_in_executor(None, queue_check, server_id)


def delivered(call: Call) -> dict[str, Reply]:
    """The responses that reached (or, once settled, will reach) the agent, by id key: a JSON
    answer is all or nothing; a stream's events left as they arrived."""
    if call.screen is None or (call.failure is not None and not call.streaming):
        return {}
    return call.screen.replies


class McpProxy:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = headers_of(scope)
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        call = Call(method=scope["method"],
                    request_id=incoming_id if REQUEST_ID_RE.fullmatch(incoming_id) else uuid.uuid4().hex)
        try:
            await self.handle(call, scope, headers, receive, send)
        except ProxyError as exc:
            call.failure = exc
        except asyncio.CancelledError:
            call.failure = ProxyError(499, -32000, "Cancelled.", outcome=Outcome.CLIENT_DISCONNECT)
            await self.settle(call, send)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed, the request is still settled and recorded
            logger.exception("proxy failure", extra={"event": "proxy_failure", "request_id": call.request_id})
            call.failure = ProxyError(500, -32603, "TwinMCP could not relay this request; the failure is logged "
                                      f"under request id {call.request_id}.", error_class="internal",
                                      detail=f"{type(exc).__name__}: {exc}")
        await self.settle(call, send)

    # --- request checks ---------------------------------------------------------------------------------------

    def check_host(self, headers: dict[bytes, bytes]) -> None:
        """DNS-rebinding protection: the gateway answers only for its own names."""
        host = headers.get(b"host", b"").decode("latin-1")
        domain, _ = split_domain_port(host)
        if not domain or not validate_host(domain, allowed_hosts()):
            raise ProxyError(421, -32600, f"Host {host!r} is not served here.")
        origin = headers.get(b"origin")
        if origin is not None:
            origin_host = origin.decode("latin-1").split("://", 1)[-1]
            origin_domain, _ = split_domain_port(origin_host)
            if not origin_domain or not validate_host(origin_domain, allowed_hosts()):
                raise ProxyError(403, -32600, "Origin not allowed.")

    async def authenticate(self, call: Call, headers: dict[bytes, bytes]) -> KeyInfo:
        raw_header = headers.get(b"authorization")
        try:
            raw = parse_authorization(raw_header.decode("latin-1") if raw_header else None)
            return await get_key(raw)
        except ApiKeyError as exc:
            raise ProxyError(401, -32001, str(exc),
                             headers=[(b"www-authenticate", b'Bearer realm="twinmcp"')]) from None

    async def load_server(self, call: Call, server_id: uuid.UUID, key: KeyInfo) -> ServerInfo:
        server = await get_server(server_id, key)
        if server is None or not server.flag_on:
            raise ProxyError(404, -32002, "Unknown MCP server.")
        call.server = server
        if server.disabled:
            raise ProxyError(503, -32003, f"The MCP server {server.name!r} is disabled by a workspace admin.",
                             outcome=Outcome.UPSTREAM_ERROR, error_class="disabled")
        if server.credential_error:
            raise ProxyError(502, -32004, f"TwinMCP cannot use the stored credentials of {server.name!r}: "
                             f"{server.credential_error}", outcome=Outcome.UPSTREAM_ERROR, error_class="credentials")
        return server

    async def read_body(self, receive: Receive) -> bytes:
        limit = settings.EXTERNAL_MCP_PROXY_MAX_BODY_BYTES
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProxyError(499, -32000, "Client disconnected.", outcome=Outcome.CLIENT_DISCONNECT)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, -32600, f"Request body larger than {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def govern(self, call: Call, server: ServerInfo, headers: dict[bytes, bytes]) -> None:
        self.check_routing_headers(call, headers)
        for message in call.messages:
            if message.get("method") != "tools/call":
                continue
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            refusal = tool_refusal(server, name) if isinstance(name, str) else "tools/call without a tool name."
            if refusal:
                raise ProxyError(200, -32602, refusal, outcome=Outcome.BLOCKED,
                                 data={"tool": name, "state": server.tool_states.get(name or "", "unknown")})

    @staticmethod
    def check_routing_headers(call: Call, headers: dict[bytes, bytes]) -> None:
        """``Mcp-Method`` and ``Mcp-Name`` must say what the body says (the 2026-07-28 rule,
        HeaderMismatch): an upstream that routes on the headers would otherwise run a tool the
        governance never saw."""
        method_header = headers.get(b"mcp-method")
        name_header = headers.get(b"mcp-name")
        if method_header is None and name_header is None:
            return
        requests = [m for m in call.messages if "method" in m]
        if method_header is not None and any(m["method"] != method_header.decode("latin-1") for m in requests):
            raise ProxyError(400, -32020, "The Mcp-Method header does not match the request body.")
        if name_header is None:
            return
        name = decode_header_value(name_header.decode("latin-1"))
        for message in requests:
            params = message.get("params")
            if message["method"] == "tools/call" and (not isinstance(params, dict) or params.get("name") != name):
                raise ProxyError(400, -32020, "The Mcp-Name header does not match the tool named in the body.")

    async def take_quota(self, call: Call, key: KeyInfo) -> list[tuple[bytes, bytes]]:
        if not call.counted:
            return []
        try:
            decision = await get_limiter().aconsume(key.user_id, key.daily_limit, call.counted)
        except QuotaUnavailable as exc:
            retry = str(exc.retry_after).encode()
            raise ProxyError(503, -32005, f"The daily quota cannot be checked right now; try again in "
                             f"{exc.retry_after} s.", outcome=Outcome.ERROR, error_class="quota_unavailable",
                             headers=[(b"retry-after", retry)], data={"retry_after": exc.retry_after}) from None
        headers: list[tuple[bytes, bytes]] = []
        if decision.limit is not None:
            reset = str(decision.retry_after).encode()
            headers = [(b"ratelimit-limit", str(decision.limit).encode()),
                       (b"ratelimit-remaining", str(decision.remaining or 0).encode()),
                       (b"ratelimit-reset", reset)]
        if decision.allowed:
            call.quota = decision
        else:
            metrics.QUOTA_REJECTIONS.labels(server_label(call)).inc()
            raise ProxyError(
                429, -32029,
                f"Daily limit of {decision.limit} tool calls reached for the {key.plan} plan; it resets at "
                f"{decision.reset_at:%H:%M} UTC.",
                outcome=Outcome.QUOTA, headers=[(b"retry-after", str(decision.retry_after).encode()), *headers],
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
        try:
            server_id = uuid.UUID(match.group(1)) if match else None
        except ValueError:
            server_id = None
        if server_id is None:
            raise ProxyError(404, -32002, "Unknown MCP server.")
        if call.method not in ("POST", "GET", "DELETE"):
            raise ProxyError(405, -32600, f"Method {call.method} not allowed.",
                             headers=[(b"allow", b"GET, POST, DELETE")])
        key = call.key = await self.authenticate(call, headers)
        server = await self.load_server(call, server_id, key)
        if call.method == "POST":
            timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
            try:
                call.body = await asyncio.wait_for(self.read_body(receive), timeout_s)
            except TimeoutError:
                raise ProxyError(408, -32600, f"The request body did not arrive within {timeout_s:g} s.") from None
            try:
                call.messages, call.batch = messages_of(call.body)
            except InvalidMessage as exc:
                raise ProxyError(400, -32600, f"Invalid request: {exc}.") from None
            except ValueError as exc:
                raise ProxyError(400, -32700, f"Parse error: the body is {exc}.") from None
            counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
            call.counted = sum(1 for m in call.messages if is_request(m) and m["method"] in counted_methods)
            self.govern(call, server, headers)
        extra = await self.take_quota(call, key)
        await self.forward(call, headers, receive, send, extra)

    def upstream_headers(self, headers: dict[bytes, bytes], server: ServerInfo, call: Call) -> dict[str, str]:
        out = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers.items()
               if name in FORWARD_HEADERS or name.startswith(b"mcp-param-")}
        out.update(server.auth_headers)
        out["X-Request-Id"] = call.request_id
        return out

    async def forward(self, call: Call, headers: dict[bytes, bytes], receive: Receive, send: Send,
                      extra: list[tuple[bytes, bytes]]) -> None:
        server = call.server
        assert server is not None
        timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
        if call.method == "GET":
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=None)
        else:
            # total covers the body too: aiohttp reads it under the same timer (a slowloris cannot outlast it).
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
                raise _upstream(server, 502, -32010, "the upstream host name does not resolve.", "dns") from None
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                raise _upstream(server, 502, -32011, "TLS handshake with the upstream failed (invalid or untrusted "
                                "certificate).", "tls", detail=str(exc)) from None
            except urlpolicy.UrlPolicyError as exc:
                # The reason names the address the host resolved to: for the log and the admin, not the agent.
                raise _upstream(server, 502, -32012, "the upstream address is refused by the URL policy.",
                                "policy", detail=str(exc)) from None
            except aiohttp.ClientConnectorError as exc:
                if attempt == 1:
                    continue  # nothing was sent: repeating is safe
                raise _upstream(server, 502, -32013, "cannot connect to the upstream server.", "connect",
                                detail=str(exc)) from None
            except TimeoutError:
                raise timed_out(server, timeout_s) from None
            except aiohttp.ClientError as exc:
                raise connection_failed(server, exc) from None
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
        if status in (401, 403):
            raise _upstream(server, 502, -32016, f"the upstream refused TwinMCP's stored credentials (HTTP {status}); "
                            "a workspace admin must rotate them.", "auth")
        if 300 <= status < 400:
            raise _upstream(server, 502, -32017, "the upstream answered with a redirect, which is not followed.",
                            "redirect")
        out_headers = [(b"x-request-id", call.request_id.encode()), *extra]
        session_id = response.headers.get("Mcp-Session-Id")
        if session_id is not None:
            if SESSION_ID_RE.fullmatch(session_id):
                out_headers.append((b"mcp-session-id", session_id.encode()))
            elif status < 400:
                raise invalid_answer(server, "carries an invalid session id (visible ASCII expected)")
        if status >= 400 or call.method == "DELETE":
            await self.pass_through(call, response, out_headers, content_type)
            return
        call.screen = Screen(call.messages, approved_by(server), replay=call.method == "GET")
        if call.method == "POST" and not call.screen.pending:
            # Notifications and responses only: the spec's answer is 202 and no body; a body is not read.
            call.status = 202
            call.reply_headers = out_headers
            return
        if call.method == "POST" and (status in (202, 204) or response.content_length == 0):
            raise invalid_answer(server, f"is empty (HTTP {status}) where a response was expected")
        if kind == EVENT_STREAM:
            await self.stream(call, response, receive, send, [*out_headers, _content_type(content_type, EVENT_STREAM),
                                                              (b"cache-control", b"no-cache")])
            return
        if kind == JSON and call.method == "POST":
            body = await self.read_whole(call, response)
            try:
                call.reply = call.screen.json_answer(body)
            except InvalidAnswer as exc:
                raise invalid_answer(server, str(exc)) from None
            call.status = status
            call.reply_headers = [*out_headers, _content_type(content_type, JSON)]
            return
        expected = "an event stream" if call.method == "GET" else "JSON or an event stream"
        raise _upstream(server, 502, -32018, f"the upstream answered with content type {kind or '(none)'!r}; "
                        f"expected {expected}.", "protocol")

    async def pass_through(self, call: Call, response: aiohttp.ClientResponse, out_headers: list[tuple[bytes, bytes]],
                           content_type: str) -> None:
        """An error status (or a DELETE's answer) goes back as the upstream sent it: read whole, not parsed."""
        status = response.status
        if status >= 400:
            call.outcome = Outcome.ERROR
            if status >= 500:
                metrics.ERRORS.labels(server_label(call), "proxy", "http").inc()
            else:
                await self.refund(call)
        body = await self.read_whole(call, response)
        server = call.server
        assert server is not None
        kind = content_type.split(";")[0].strip().lower()
        if kind in (JSON, EVENT_STREAM) and body:
            body = answers.error_body(body, kind, approved_by(server))
        if HEADER_VALUE_RE.fullmatch(content_type):
            out_headers.append((b"content-type", content_type.encode()))
        call.status = status
        call.reply_headers = out_headers
        call.reply = body

    async def read_whole(self, call: Call, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, or a ProxyError: cut short, over the cap, stalled. ``content.read(n)``
        would return only what happens to be buffered."""
        server = call.server
        assert server is not None
        cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
        if response.content_length is not None and response.content_length > cap:
            raise too_large(server)
        chunks: list[bytes] = []
        try:
            async for chunk in response.content.iter_any():
                call.bytes_out += len(chunk)
                if call.bytes_out > cap:
                    raise too_large(server)
                chunks.append(chunk)
        except aiohttp.ClientPayloadError as exc:
            raise truncated(server, exc) from None
        except TimeoutError:
            raise timed_out(server, settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000) from None
        except aiohttp.ClientError as exc:
            raise connection_failed(server, exc) from None
        return b"".join(chunks)

    async def stream(self, call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send,
                     headers: list[tuple[bytes, bytes]]) -> None:
        """Forward SSE events as they arrive; stop on client disconnect, an idle GET stream or a
        failure (then ``settle`` ends the stream with an error event for each unanswered request)."""
        call.status = response.status
        await send({"type": "http.response.start", "status": call.status, "headers": headers})
        call.response_started = call.streaming = True
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            pump = asyncio.ensure_future(self.pump(call, response, send))
            done, _ = await asyncio.wait({pump, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
                if call.method == "GET" or (call.screen is not None and call.screen.pending):
                    raise ProxyError(499, -32000, "Client disconnected.", outcome=Outcome.CLIENT_DISCONNECT)
            else:
                pump.result()
        finally:
            disconnect.cancel()

    async def pump(self, call: Call, response: aiohttp.ClientResponse, send: Send) -> None:
        server, screen = call.server, call.screen
        assert server is not None and screen is not None
        post = call.method == "POST"
        cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
        parser = sse.Parser(max_event_bytes=cap)
        unfinished: sse.Event | None = None
        try:
            while True:
                chunk = await asyncio.wait_for(response.content.readany(),
                                               timeout=settings.EXTERNAL_MCP_PROXY_STREAM_IDLE_SECONDS)
                if not chunk:
                    break
                call.bytes_out += len(chunk)
                if post and call.bytes_out > cap:
                    raise too_large(server)
                await self.forward_events(call, parser.feed(chunk), send)
                if post and not screen.pending:
                    # Every request is answered: the stream is done (the spec lets the server close
                    # it now); what already arrived goes along, nothing more is waited for.
                    with contextlib.suppress(aiohttp.ClientError, sse.EventTooLarge):
                        await self.forward_events(call, parser.feed(response.content.read_nowait()), send)
                    return
            closing, unfinished = parser.close()
            await self.forward_events(call, closing, send)
        except sse.EventTooLarge:
            raise too_large(server) from None
        except TimeoutError:
            if post:
                idle = settings.EXTERNAL_MCP_PROXY_STREAM_IDLE_SECONDS
                raise timed_out(server, min(idle, settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000)) from None
            return  # an idle GET stream ends; the agent reconnects when it wants more
        except aiohttp.ClientPayloadError as exc:
            raise truncated(server, exc) from None
        except aiohttp.ClientError as exc:
            raise connection_failed(server, exc) from None
        if screen.pending:
            if unfinished is not None:
                screen.problem = "it stopped in the middle of an event"
            elif screen.resumable and not screen.problem:
                return  # SEP-1699: the client resumes with GET and Last-Event-ID and gets the response there
            raise unanswered(server, screen.problem)

    async def forward_events(self, call: Call, events: list[sse.Event], send: Send) -> None:
        if not events:
            return
        assert call.screen is not None
        out = b"".join(call.screen.event(event) for event in events)
        if call.screen.list_changed:
            call.screen.list_changed = False
            if call.server is not None:
                check_soon(call.server.id)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})

    # --- the end of every request -------------------------------------------------------------------------

    async def settle(self, call: Call, send: Send) -> None:
        """The one exit: refund what the agent got no answer for, record the usage events, count
        and log the request, then send what is left: the last byte goes after all of that."""
        exc = call.failure
        if exc is not None:
            await self.fail(call, exc)
        try:
            await self.record(call)
        except Exception:  # noqa: BLE001 - e.g. a pluggable token counter; the answer still goes out
            logger.exception("usage events not recorded", extra={"event": "proxy_failure",
                                                                 "request_id": call.request_id})
        self.after(call)
        if exc is None or exc.status != 499:
            if not call.response_started:
                headers = [*call.reply_headers, (b"content-length", str(len(call.reply)).encode())]
                await send({"type": "http.response.start", "status": call.status, "headers": headers})
            await send({"type": "http.response.body", "body": call.reply, "more_body": False})

    async def fail(self, call: Call, exc: ProxyError) -> None:
        call.outcome = exc.outcome
        call.error_code = exc.code
        if exc.error_class and call.server is not None:
            metrics.ERRORS.labels(server_label(call), "proxy", exc.error_class).inc()
        if exc.outcome != Outcome.CLIENT_DISCONNECT:
            await self.refund(call, keep_delivered=True)
        if call.streaming:
            ids = call.screen.unanswered if call.screen is not None else []
            call.reply = b"".join(b"data: " + error_body(i, exc.code, exc.message) + b"\n\n" for i in ids)
            return
        call.status = exc.status
        call.reply_headers = [(b"content-type", b"application/json"), (b"x-request-id", call.request_id.encode()),
                              *exc.headers]
        ids = [m["id"] for m in call.messages if is_request(m)]
        if call.batch and ids:
            call.reply = dumps([error_response(i, exc.code, exc.message, exc.data) for i in ids])
        else:
            request_id = call.messages[0].get("id") if len(call.messages) == 1 else None
            call.reply = error_body(request_id, exc.code, exc.message, exc.data)

    async def refund(self, call: Call, *, keep_delivered: bool = False) -> None:
        """Give back the counted uses the agent got no answer for: all of them, unless
        ``keep_delivered``, then those whose response already reached the agent stay counted."""
        if call.quota is None or call.key is None:
            return
        counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
        replies = delivered(call) if keep_delivered else {}
        given = [i for i, m in enumerate(call.messages) if is_request(m) and m["method"] in counted_methods
                 and i not in call.refunded and id_key(m["id"]) not in replies]
        if given:
            call.refunded.update(given)
            await get_limiter().arefund(call.key.user_id, call.quota, len(given), refunded_total=len(call.refunded))

    async def record(self, call: Call) -> None:
        """One usage event per JSON-RPC message (or one for a GET/DELETE), committed before the
        answer's last byte. Nothing is recorded for a server outside the caller's workspace."""
        key, server = call.key, call.server
        if key is None or server is None:
            return
        latency_ms = call.latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
        counter = token_counter()
        replies = delivered(call)
        now = timezone.now()
        base = {
            "created_at": now, "user_id": key.user_id, "workspace_id": key.workspace_id,
            "server_id": server.id, "api_key_id": key.key_id, "request_id": call.request_id,
            "latency_ms": latency_ms, "upstream_status": call.upstream_status,
        }
        rows: list[dict[str, Any]] = []
        messages = call.messages or [{"method": call.method}]
        share_out = call.bytes_out // max(1, len(messages))
        counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
        for index, message in enumerate(messages):
            method = message.get("method", call.method)
            params = message.get("params") if isinstance(message.get("params"), dict) else {}
            tool = params.get("name") if method == "tools/call" else ""
            jsonrpc_id = message.get("id")
            reply = replies.get(id_key(jsonrpc_id)) if "id" in message else None
            if reply is not None:
                code = reply.error_code
                outcome = Outcome.OK if code is None else Outcome.ERROR
            else:
                code = call.error_code
                outcome = call.outcome
                if outcome == Outcome.OK and (code is not None or call.status >= 400):
                    outcome = Outcome.ERROR
            raw_in = call.body if len(messages) == 1 else dumps(message)
            raw_out = reply.raw if reply is not None else b""
            size_out = reply.size if reply is not None else share_out
            rows.append({
                **base, "method": _text(method, 100), "tool_name": _text(tool or "", 200),
                "jsonrpc_id": _text(jsonrpc_id if isinstance(jsonrpc_id, str) or jsonrpc_id is None
                                    else dumps(jsonrpc_id).decode(), 100),
                "tokens_in": counter.count(raw_in) if raw_in else 0,
                "tokens_out": counter.count(raw_out) if raw_out else (size_out + 3) // 4,
                "bytes_in": len(raw_in), "bytes_out": size_out, "jsonrpc_error_code": code, "outcome": outcome,
                "counted": (call.quota is not None and method in counted_methods and "id" in message
                            and index not in call.refunded),
            })
        recorder = get_recorder()
        if len(rows) == 1:
            await recorder.record(rows[0])
        else:  # handed over together, so they share one commit
            await asyncio.gather(*(recorder.record(row) for row in rows))

    def after(self, call: Call) -> None:
        label = server_label(call)
        latency = call.latency_ms if call.latency_ms is not None else (time.perf_counter() - call.started) * 1000
        method = call.messages[0].get("method", call.method) if len(call.messages) == 1 else call.method
        metrics.REQUESTS.labels(label, method if method in _METRIC_METHODS else "other", call.outcome).inc()
        metrics.LATENCY.labels(label, "proxy").observe(latency / 1000)
        if logger.isEnabledFor(logging.INFO):
            tool = ""
            if method == "tools/call" and isinstance(call.messages[0].get("params"), dict):
                tool = _text(call.messages[0]["params"].get("name", ""), 200)
            logger.info("proxied request", extra={
                "event": "proxy_request", "request_id": call.request_id,
                "server": str(call.server.id) if call.server is not None else "",
                "workspace": str(call.key.workspace_id) if call.key else "",
                "user": call.key.user_id if call.key else None, "method": method, "tool": tool,
                "outcome": call.outcome, "status": call.status, "latency_ms": round(latency, 2),
                "detail": call.failure.detail if call.failure is not None else ""})


_METRIC_METHODS = {"tools/call", "tools/list", "initialize", "server/discover", "notifications/initialized",
                   "resources/read", "resources/list", "prompts/get", "prompts/list", "ping", "GET", "DELETE",
                   "POST"}


def _content_type(upstream: str, default: str) -> tuple[bytes, bytes]:
    return b"content-type", (upstream if HEADER_VALUE_RE.fullmatch(upstream) else default).encode()


def _text(value: Any, limit: int) -> str:
    """A value as PostgreSQL text can hold it: no NUL, no lone surrogate, at most ``limit``
    characters. One unstorable row would fail the whole group-commit batch it is in."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")[:limit]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


proxy_app = McpProxy()


class Router:
    """Sends every proxy path (``/api/v1/external-mcp/<anything>/mcp…``) to the raw ASGI proxy,
    which answers a JSON 404 for those that name no server, and everything else to Django."""

    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and PREFIX_RE.match(scope["path"]):
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
