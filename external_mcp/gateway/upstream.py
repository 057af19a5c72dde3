"""How the aggregate endpoints talk to one member server: in the agent's own era where the server
speaks it (2026-07-28: no session), else through a handshake-era session TwinMCP opens itself,
keeps in the agent session's record (``sessions``), re-opens once when the server forgot it (404)
and closes when the agent session ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings
from mcp.shared.inbound import encode_header_value
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from external_mcp import sse
from external_mcp.gateway import bridge, sessions, transport
from external_mcp.gateway.call import Call
from external_mcp.gateway.errors import ProxyError, credentials_refused, too_large, upstream_error
from external_mcp.gateway.relay import SESSION_ID_RE
from external_mcp.gateway.sessions import Record, StoreDown, Upstream
from external_mcp.jsonrpc import dumps, is_response, parse_json
from external_mcp.proxy_cache import ServerInfo
from external_mcp.served_catalog import Member

logger = logging.getLogger("external_mcp.proxy")

LATEST_HANDSHAKE = HANDSHAKE_PROTOCOL_VERSIONS[-1]
ENVELOPE_PREFIX = "io.modelcontextprotocol/"
MODERN = MODERN_PROTOCOL_VERSIONS[-1]
CLIENT_INFO = {"name": "twinmcp-gateway", "version": "1.0"}
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri", "resources/subscribe": "uri",
               "resources/unsubscribe": "uri"}


@dataclass
class Agent:
    """Who is calling an aggregate endpoint, in which era, and where its upstream sessions are kept."""

    modern: bool
    scope: str
    session_id: str | None
    """TwinMCP's session id, for a handshake-era agent."""
    record: Record
    version_header: str | None
    """The ``MCP-Protocol-Version`` the agent sent with this request."""
    stored: bool = True
    """False when the store was unreachable: upstream sessions opened now are not kept."""
    loaded: bool = True
    """A sessionless agent's record is read only when a member needs a session: most requests of a
    2026-07-28 agent reach 2026-07-28 members and cost no store round trip."""

    async def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        try:
            self.record = await sessions.store().load(self.scope) or Record()
        except StoreDown:
            self.stored = False


def modern_for(agent: Agent, member: Member) -> bool:
    return agent.modern and member.era == "stateless"


def bridged(agent: Agent, member: Member) -> bool:
    """A 2026-07-28 agent reaching a handshake-era member: its results need the new era's fields."""
    return agent.modern and not modern_for(agent, member)


def handshake_form(message: dict[str, Any]) -> dict[str, Any]:
    """A 2026-07-28 agent's request as a handshake-era session carries it: without the per-request
    envelope (``io.modelcontextprotocol/*`` in ``_meta``), which such servers refuse."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or not any(k.startswith(ENVELOPE_PREFIX) for k in meta):
        return message
    kept = {k: v for k, v in meta.items() if not k.startswith(ENVELOPE_PREFIX)}
    rest = {k: v for k, v in params.items() if k != "_meta"}
    return {**message, "params": {**rest, "_meta": kept} if kept else rest}


def completed(message: dict[str, Any]) -> dict[str, Any]:
    """A handshake-era response as a 2026-07-28 agent requires it (``resultType`` is mandatory there)."""
    result = message.get("result")
    if isinstance(result, dict) and "resultType" not in result:
        return {**message, "result": {**result, "resultType": "complete"}}
    return message


def headers_for(call: Call, agent: Agent, member: Member, message: dict[str, Any],
                upstream: Upstream | None) -> dict[bytes, bytes]:
    """The MCP headers of one request to a member, as if the agent had sent it there."""
    headers = {b"accept": b"application/json, text/event-stream", b"content-type": b"application/json"}
    method = message.get("method")
    if modern_for(agent, member):
        headers[b"mcp-protocol-version"] = MODERN.encode()
        if isinstance(method, str):
            headers[b"mcp-method"] = method.encode()
            params = message.get("params")
            value = params.get(NAME_PARAMS.get(method, "")) if isinstance(params, dict) else None
            if isinstance(value, str):
                headers[b"mcp-name"] = encode_header_value(value).encode()
    elif upstream is not None:
        if upstream.session_id:
            headers[b"mcp-session-id"] = upstream.session_id.encode()
        version = upstream.version
        if not agent.modern and agent.version_header and upstream.version == agent.record.version:
            version = agent.version_header  # as the agent sent it, as the per-server endpoint does
        headers[b"mcp-protocol-version"] = version.encode()
    return headers


async def session_for(call: Call, agent: Agent, member: Member, server: ServerInfo, *,
                      fresh: bool = False) -> Upstream | None:
    """The upstream session this agent uses at this member (None: the member needs none)."""
    if modern_for(agent, member):
        return None
    await agent.load()
    known = agent.record.upstreams.get(str(server.id))
    if known is not None and not fresh:
        return known
    upstream = await open_session(call, agent, server)
    agent.record.upstreams[str(server.id)] = upstream
    if agent.stored:
        owner = {"user": call.key.user_id if call.key else None,
                 "workspace": str(call.key.workspace_id) if call.key else ""}
        try:
            await sessions.store().keep(agent.scope, str(server.id), upstream, owner)
        except StoreDown as exc:
            logger.warning("upstream session of %s not kept (%s); the next request opens another", server.id, exc)
    return upstream


async def open_session(call: Call, agent: Agent, server: ServerInfo) -> Upstream:
    """The initialize handshake with a member, in the agent's version where it is a handshake one."""
    version = agent.record.version if agent.record.version in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE
    capabilities = agent.record.capabilities if not agent.modern else {}
    initialize = {"jsonrpc": "2.0", "id": "twinmcp-initialize", "method": "initialize",
                  "params": {"protocolVersion": version, "capabilities": capabilities, "clientInfo": CLIENT_INFO}}
    if server.legacy_sse:
        session_id, result = await bridge.open_upstream(call, server, initialize)
        return Upstream(session_id, _negotiated(server, result))
    sent = await transport.token_headers(server)
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               **server.auth_headers, **sent, "X-Request-Id": call.request_id}
    try:
        result, session_id = await _exchange(server, dumps(initialize), headers, "twinmcp-initialize")
    except ProxyError as exc:
        if exc.error_class != "auth" or not sent:
            raise
        # The token was revoked or ended early: one new token, one new try (as tool calls do).
        headers.update(await transport.token_headers(server, refused=sent))
        result, session_id = await _exchange(server, dumps(initialize), headers, "twinmcp-initialize")
    negotiated = _negotiated(server, result)
    if session_id is not None and not SESSION_ID_RE.fullmatch(session_id):
        raise _refused(server, "its session id is not visible ASCII")
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    headers["MCP-Protocol-Version"] = negotiated
    await _exchange(server, b'{"jsonrpc":"2.0","method":"notifications/initialized"}', headers, None)
    return Upstream(session_id or "", negotiated)


def _negotiated(server: ServerInfo, result: Any) -> str:
    negotiated = result.get("protocolVersion") if isinstance(result, dict) else None
    if not isinstance(negotiated, str) or negotiated not in HANDSHAKE_PROTOCOL_VERSIONS:
        raise _refused(server, "it offered no protocol version TwinMCP speaks")
    return negotiated


async def close_session(server: ServerInfo, upstream: Upstream) -> None:
    """Ends one upstream session; failures are only logged (the server idles it out anyway)."""
    if not upstream.session_id:
        return
    if server.legacy_sse:
        with contextlib.suppress(ProxyError):
            await bridge.session_close(upstream.session_id)
        return
    try:
        headers = {**server.auth_headers, **await transport.token_headers(server),
                   "Mcp-Session-Id": upstream.session_id, "MCP-Protocol-Version": upstream.version}
        async with transport.upstream_session().delete(
                server.base_url, headers=headers, ssl=server.ssl, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=5)) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError, ProxyError) as exc:
        logger.info("upstream session at %s not closed: %s", server.id, exc)


async def _exchange(server: ServerInfo, body: bytes, headers: dict[str, str],
                    request_id: str | None) -> tuple[Any, str | None]:
    timeout = aiohttp.ClientTimeout(total=settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000, sock_connect=10)
    try:
        async with transport.upstream_session().post(server.base_url, data=body, headers=headers, ssl=server.ssl,
                                                     allow_redirects=False, timeout=timeout) as response:
            if response.status in (401, 403):
                raise credentials_refused(server, response.status)
            if response.status >= 300:
                raise _refused(server, f"HTTP {response.status}")
            if request_id is None:
                return None, None
            raw = await _read_all(server, response)
            kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            session_id = response.headers.get("Mcp-Session-Id")
    except TimeoutError:
        raise upstream_error(server, 504, -32014, "the upstream did not answer TwinMCP's initialize in time.",
                             "timeout") from None
    except aiohttp.ClientError as exc:
        raise upstream_error(server, 502, -32013, "cannot connect to the upstream server.", "connect",
                             detail=str(exc)) from None
    for message in _messages(raw, kind):
        if is_response(message) and message.get("id") == request_id:
            if "error" in message:
                raise _refused(server, "it answered initialize with an error")
            return message.get("result"), session_id
    raise _refused(server, "its answer to initialize has no response")


async def _read_all(server: ServerInfo, response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES:
            raise too_large(server)
        chunks.append(chunk)
    return b"".join(chunks)


def _messages(raw: bytes, kind: str) -> list[Any]:
    chunks = sse.data_of(raw) if kind == "text/event-stream" else [raw]
    found: list[Any] = []
    for chunk in chunks:
        try:
            data = parse_json(chunk.encode() if isinstance(chunk, str) else chunk)
        except ValueError:
            continue
        found.extend(data if isinstance(data, list) else [data])
    return found


def _refused(server: ServerInfo, why: str) -> ProxyError:
    return upstream_error(server, 502, -32024, f"the upstream did not open a session for TwinMCP ({why}).",
                          "handshake")


async def close_all(record: Record, load: Any) -> None:
    """Close every upstream session of an ended agent session; ``load`` gives a server's info."""
    tasks = []
    for server_id, upstream in record.upstreams.items():
        server = await load(server_id)
        if server is not None:
            tasks.append(close_session(server, upstream))
    await asyncio.gather(*tasks, return_exceptions=True)



async def connect(call: Call, agent: Agent, member: Member, server: ServerInfo,
                  message: dict[str, Any]) -> aiohttp.ClientResponse:
    """The member's response to ``call``'s body, on a session opened again once if it forgot ours."""
    upstream = await session_for(call, agent, member, server)
    response = await bridge.forward(call, headers_for(call, agent, member, message, upstream))
    if response.status == 404 and upstream is not None and upstream.session_id:
        response.release()
        upstream = await session_for(call, agent, member, server, fresh=True)
        response = await bridge.forward(call, headers_for(call, agent, member, message, upstream))
    return response
