"""The workspace endpoint ``/api/v1/external-mcp/mcp`` and the toolset endpoints
``/api/v1/external-mcp/toolsets/<id>/mcp``: one MCP server made of the approved tools of several.

TwinMCP is the server the agent talks to, in either era: the handshake (``initialize``, its own
``Mcp-Session-Id``, ``ping``, DELETE, a GET stream) and 2026-07-28 (``server/discover``, the
per-request envelope and routing headers, ``subscriptions/listen``). It answers itself what
needs no upstream: ``tools/list`` from the approved catalog (``served_catalog``), never from an
upstream. What an upstream must answer runs the same pipeline as the per-server endpoint, on the
owning server, with the upstream's own names: ``tools/call``, ``resources/read``, ``prompts/get``,
completions and resource subscriptions; resource and prompt lists are gathered (``fanout``).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS, InboundLadderRejection, classify_inbound_request
from mcp_types import PROTOCOL_VERSION_META_KEY, SERVER_INFO_META_KEY
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from external_mcp.gateway import bridge, fanout, inbound, listen, quota, relay, sessions
from external_mcp.gateway.call import Call, Receive, Scope, Send
from external_mcp.gateway.errors import ProxyError
from external_mcp.gateway.pipeline import Pipeline
from external_mcp.gateway.sessions import Record, StoreDown
from external_mcp.gateway.upstream import (
    LATEST_HANDSHAKE,
    Agent,
    bridged,
    close_all,
    completed,
    connect,
    handshake_form,
    headers_for,
)
from external_mcp.jsonrpc import dumps, is_request, parse_json
from external_mcp.proxy_cache import KeyInfo, flag_on, get_server, server_for
from external_mcp.served_catalog import InvalidCursor, Member, View, get_view, route_prefixed
from usage.models import Endpoint, Outcome

logger = logging.getLogger("external_mcp.proxy")

PATH_RE = re.compile(r"^/api/v1/external-mcp/(?:toolsets/([^/]*)/)?mcp/?$")
SERVER_INFO = {"name": "twinmcp", "version": "1.0"}
OUTGOING = "twinmcp:"
"""How the id of a request an upstream sends the agent starts: ``twinmcp:<server id>:<its JSON id>``."""
NAMED = {"prompts/get": ("prompts", "name"), "resources/read": ("resources", "uri"),
         "resources/subscribe": ("resources", "uri"), "resources/unsubscribe": ("resources", "uri")}
JSON_HEADERS = [(b"content-type", b"application/json")]
ROUTING_HEADERS = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
"""What the 2026-07-28 ladder compares with the body (the SDK reads no other header)."""


class AggregateEndpoint(Pipeline):
    """TwinMCP as the MCP server of a workspace or toolset; what it cannot answer itself goes to
    the owning server through the shared pipeline."""

    async def handle(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        inbound.check_host(headers)
        toolset_id = toolset_of(scope["path"])
        inbound.check_method(call.method)
        key = call.key = await inbound.authenticate(headers)
        call.endpoint = Endpoint.TOOLSET if toolset_id is not None else Endpoint.WORKSPACE
        view = await load_view(key, toolset_id)
        call.lap("auth")
        call.toolset_id = toolset_id
        call.accepts_events = b"text/event-stream" in headers.get(b"accept", b"")
        where = scope["path"].rstrip("/")
        message: dict[str, Any] | None = None
        if call.method == "POST":
            await inbound.read_messages(call, receive)
            if call.batch:
                raise ProxyError(400, -32600, "This endpoint takes one JSON-RPC message per request.")
            message = call.messages[0]
            call.lap("request")
            if message.get("method") == "initialize" and is_request(message) and not _is_modern(message, headers):
                await initialize(call, key, view, message, where)
                return
        agent = await agent_of(call, key, headers, message, where)
        if call.method == "DELETE":
            await end(call, key, agent)
            return
        if message is None:
            await listen_stream(call, key, view, agent, send, receive, None)
            return
        if "method" not in message:
            await answer_upstream(call, key, view, agent, message, receive, send)
            return
        if not is_request(message):
            call.status, call.reply_headers = 202, [(b"x-request-id", call.request_id.encode())]
            return
        await dispatch(call, key, view, agent, message, headers, receive, send)


def toolset_of(path: str) -> uuid.UUID | None:
    match = PATH_RE.match(path)
    if match is None:
        raise ProxyError(404, -32002, "Unknown MCP endpoint.")
    if match.group(1) is None:
        return None
    try:
        return uuid.UUID(match.group(1))
    except ValueError:
        raise ProxyError(404, -32002, "Unknown toolset.") from None


async def load_view(key: KeyInfo, toolset_id: uuid.UUID | None) -> View:
    view = await get_view(key.workspace_id, toolset_id) if await flag_on(key) else None
    if view is None:
        raise ProxyError(404, -32002, "Unknown toolset." if toolset_id else "Unknown MCP endpoint.")
    return view


def _is_modern(message: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
    if headers.get(b"mcp-protocol-version", b"").decode("latin-1") in MODERN_PROTOCOL_VERSIONS:
        return True
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PROTOCOL_VERSION_META_KEY in meta


async def agent_of(call: Call, key: KeyInfo, headers: dict[bytes, bytes], message: dict[str, Any] | None,
                   where: str) -> Agent:
    version_header = headers.get(b"mcp-protocol-version", b"").decode("latin-1") or None
    store = sessions.store()
    if message is not None and _is_modern(message, headers):
        if is_request(message):
            routing = {name.decode(): headers[name].decode("latin-1") for name in ROUTING_HEADERS if name in headers}
            verdict = classify_inbound_request(message, headers=routing)
            if isinstance(verdict, InboundLadderRejection):
                raise ProxyError(ERROR_CODE_HTTP_STATUS.get(verdict.code, 400), verdict.code, verdict.message,
                                 data=verdict.data if isinstance(verdict.data, dict) else None)
        return Agent(True, sessions.key_scope(key.key_id), None, Record(), version_header, loaded=False)
    session_id = headers.get(b"mcp-session-id", b"").decode("latin-1")
    if not session_id:
        raise ProxyError(400, -32600, "Bad Request: an Mcp-Session-Id header is required; send initialize first.")
    if not sessions.signed_for(session_id, key.key_id, where):
        raise ProxyError(404, -32600, "Session not found: initialize a new session.")
    call.own_session = session_id
    try:
        record = await store.load(session_id)
    except StoreDown as exc:
        logger.warning("agent session store unreachable (%s); this request opens fresh upstream sessions", exc)
        return Agent(False, session_id, session_id, Record(version=version_header or ""), version_header, stored=False)
    if record is None:
        raise ProxyError(404, -32600, "Session not found: it ended or idled out; initialize a new session.")
    return Agent(False, session_id, session_id, record, version_header)


def _reply(call: Call, request_id: Any, result: bytes) -> None:
    call.status = 200
    message = b'{"jsonrpc":"2.0","id":' + dumps(request_id) + b',"result":' + result + b"}"
    if call.accepts_events:
        call.reply_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        call.reply = b"event: message\ndata: " + message + b"\n\n"
    else:
        call.reply_headers = list(JSON_HEADERS)
        call.reply = message
    call.reply_headers.append((b"x-request-id", call.request_id.encode()))
    if call.own_session:
        call.reply_headers.append((b"mcp-session-id", call.own_session.encode()))


def _result(result: dict[str, Any], agent_modern: bool, *, cacheable: bool = False) -> bytes:
    if agent_modern:
        result = {**result, "resultType": "complete", "_meta": {SERVER_INFO_META_KEY: SERVER_INFO}}
        if cacheable:
            result.update(ttlMs=0, cacheScope="private")
    return dumps(result)


def _instructions(view: View) -> str:
    members = sorted((m for m in view.members.values() if m.serving), key=lambda m: m.prefix)
    if not view.prefixed:
        return f"{view.title}: the approved tools of {len(members)} MCP servers, under their own names."
    shown = ", ".join(f"{m.prefix} ({m.name})" for m in members[:50])
    return (f"{view.title}: the approved tools of {len(members)} MCP servers, each named <prefix>__<tool>. "
            f"Prefixes: {shown or 'none yet'}.")


async def initialize(call: Call, key: KeyInfo, view: View, message: dict[str, Any], where: str) -> None:
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    requested = params.get("protocolVersion")
    version = requested if requested in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE
    capabilities = params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {}
    session_id = sessions.issue(key.key_id, where)
    record = Record(version=version, capabilities=capabilities,
                    owner={"user": key.user_id, "workspace": str(key.workspace_id)})
    try:
        await sessions.store().create(session_id, record)
    except StoreDown as exc:
        logger.warning("agent session not stored (%s); it works until the store is back", exc)
    call.own_session = session_id
    _reply(call, message["id"], dumps({
        "protocolVersion": version, "capabilities": view.capabilities(),
        "serverInfo": {**SERVER_INFO, "title": view.title}, "instructions": _instructions(view)}))


async def dispatch(call: Call, key: KeyInfo, view: View, agent: Agent, message: dict[str, Any],
                   headers: dict[bytes, bytes], receive: Receive, send: Send) -> None:
    method = message["method"]
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    if method == "tools/list":
        try:
            page, cursor = view.page(params.get("cursor"))
        except InvalidCursor as exc:
            raise ProxyError(400 if agent.modern else 200, -32602, f"Invalid params: {exc}") from None
        parts = [b'{"tools":', page]
        if cursor:
            parts += [b',"nextCursor":', dumps(cursor)]
        if agent.modern:
            parts += [b",", _result({}, True, cacheable=True)[1:-1]]
        _reply(call, message["id"], b"".join([*parts, b"}"]))
    elif method == "server/discover":
        _reply(call, message["id"], _result({"supportedVersions": list(MODERN_PROTOCOL_VERSIONS),
                                             "capabilities": view.capabilities(),
                                             "instructions": _instructions(view)}, True, cacheable=True))
    elif method in ("ping", "logging/setLevel"):
        _reply(call, message["id"], _result({}, agent.modern))
    elif method in fanout.LISTS:
        result = await fanout.gather(call, agent, view, key, message)
        _reply(call, message["id"], _result(result, agent.modern, cacheable=True))
    elif method == "subscriptions/listen" and agent.modern:
        await listen_stream(call, key, view, agent, send, receive, message)
    elif method == "tools/call" or method in NAMED or method == "completion/complete":
        await route(call, key, view, agent, message, receive, send)
    else:
        raise ProxyError(404 if agent.modern else 200, -32601, f"Method not found: {str(method)[:100]}")


def _target(view: View, method: str, params: dict[str, Any]) -> tuple[Member, dict[str, Any]]:
    """The member that answers a routed request, and the request's params in that member's names."""
    if method == "tools/call":
        name = params.get("name")
        found = view.routes.get(name) if isinstance(name, str) else None
        if found is None:
            raise ProxyError(200, -32602, f"Tool {str(name)[:200]!r} is not in this endpoint's catalog.",
                             outcome=Outcome.BLOCKED, data={"tool": name if isinstance(name, str) else None})
        return view.members[found.server_id], {**params, "name": found.name}
    if method == "completion/complete":
        ref = params.get("ref") if isinstance(params.get("ref"), dict) else {}
        field, capability = ("uri", "resources") if ref.get("type") == "ref/resource" else ("name", "prompts")
        member, original = _named(view, capability, ref.get(field))
        return member, {**params, "ref": {**ref, field: original}}
    capability, field = NAMED[method]
    member, original = _named(view, capability, params.get(field))
    return member, {**params, field: original}


def _named(view: View, capability: str, value: Any) -> tuple[Member, str]:
    if not isinstance(value, str):
        raise ProxyError(200, -32602, "Invalid params: a name or URI is required.")
    if view.prefixed:
        parsed = route_prefixed(value)
        member = view.by_prefix.get(parsed[0]) if parsed else None
        if member is not None and parsed is not None:
            return member, parsed[1]
        raise ProxyError(200, -32602, f"{value[:200]!r} names no server of this endpoint.")
    origin = view.origins.get((capability, value))
    if origin in view.members:
        return view.members[origin], value
    serving = view.serving(capability)
    if len(serving) == 1:
        return serving[0], value
    raise ProxyError(200, -32602, f"{value[:200]!r}: list {capability} first, so TwinMCP knows which server "
                     "offers it (this toolset does not prefix names).")


async def route(call: Call, key: KeyInfo, view: View, agent: Agent, message: dict[str, Any], receive: Receive,
                send: Send) -> None:
    """A request only its owning server can answer, through the same pipeline as its own endpoint."""
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    member, upstream_params = _target(view, message["method"], params)
    server = await inbound.load_server(call, member.id, key)
    forwarded = {**message, "params": upstream_params}
    if bridged(agent, member):
        forwarded = handshake_form(forwarded)
    call.messages, call.body = [forwarded], dumps(forwarded)
    inbound.govern(call, server, {})
    call.lap("route")
    extra = await quota.take(call, key)
    server_id = server.id
    call.outgoing = lambda request: {**request, "id": f"{OUTGOING}{server_id}:{dumps(request['id']).decode()}"}
    if bridged(agent, member):
        call.incoming = completed
    response = await connect(call, agent, member, server, forwarded)
    async with response:
        await relay.answer(call, response, receive, send, extra)
    call.lap("relay")


async def answer_upstream(call: Call, key: KeyInfo, view: View, agent: Agent, message: dict[str, Any],
                          receive: Receive, send: Send) -> None:
    """The agent's answer to a request an upstream sent it (sampling, elicitation, roots) goes back to
    that upstream, under the id it gave; an answer TwinMCP cannot place is accepted and dropped."""
    found = _outgoing(message.get("id"))
    member = view.members.get(found[0]) if found else None
    if found is None or member is None:
        call.status, call.reply_headers = 202, [(b"x-request-id", call.request_id.encode())]
        return
    server = await inbound.load_server(call, member.id, key)
    forwarded = {**message, "id": found[1]}
    call.messages, call.body = [forwarded], dumps(forwarded)
    await agent.load()
    upstream = agent.record.upstreams.get(str(server.id))
    response = await bridge.forward(call, headers_for(call, agent, member, forwarded, upstream))
    async with response:
        await relay.answer(call, response, receive, send, [])


def _outgoing(request_id: Any) -> tuple[uuid.UUID, Any] | None:
    if not isinstance(request_id, str) or not request_id.startswith(OUTGOING):
        return None
    server, _, original = request_id[len(OUTGOING):].partition(":")
    try:
        return uuid.UUID(server), parse_json(original.encode())
    except ValueError:
        return None


async def end(call: Call, key: KeyInfo, agent: Agent) -> None:
    """DELETE: the agent session ends, and with it the upstream sessions TwinMCP opened for it."""
    try:
        record = await sessions.store().end(agent.scope)
    except StoreDown:
        record = agent.record
    if record is not None:
        await close_all(record, lambda server_id: get_server(uuid.UUID(server_id), key))
    call.status, call.reply_headers = 200, [(b"x-request-id", call.request_id.encode())]


async def listen_stream(call: Call, key: KeyInfo, view: View, agent: Agent, send: Send, receive: Receive,
                        message: dict[str, Any] | None) -> None:
    headers = [(b"x-request-id", call.request_id.encode())]
    if call.own_session:
        headers.append((b"mcp-session-id", call.own_session.encode()))
    first = b""
    notification = None
    if message is not None:
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        wanted = params.get("notifications") if isinstance(params.get("notifications"), dict) else {}
        honoured = {"toolsListChanged": True} if wanted.get("toolsListChanged") else {}
        meta = {"io.modelcontextprotocol/subscriptionId": message["id"]}
        first = listen.event({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                              "params": {"_meta": meta, "notifications": honoured}})
        notification = {"jsonrpc": "2.0", "method": listen.LIST_CHANGED, "params": {"_meta": meta}}
    await listen.stream(call, send, receive, lambda: get_view(key.workspace_id, view.toolset_id), headers,
                        first=first, notification=notification)


async def sweep() -> int:
    """End the agent sessions idle past their limit and close their upstream sessions."""
    store = sessions.store()
    ended = 0
    for scope in await store.idle():
        record = await store.end(scope)
        if record is None:
            continue
        ended += 1
        owner = record.owner
        user, workspace = owner.get("user"), owner.get("workspace")
        if isinstance(user, int) and workspace:
            await close_all(record, lambda server_id, u=user, w=workspace: server_for(uuid.UUID(server_id), u,
                                                                                        uuid.UUID(w)))
    return ended
