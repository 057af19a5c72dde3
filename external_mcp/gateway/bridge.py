"""HTTP+SSE upstreams (protocol 2024-11-05) behind the gateway's Streamable HTTP.

Agents always speak Streamable HTTP to TwinMCP. For a server on the old transport, an agent's
``initialize`` opens the upstream's event stream in this worker, which becomes the session's
owner: it reads every message the upstream sends and routes it (``bridge_store``) to whoever
waits for it, on any worker. The agent's session id is TwinMCP's, signed for its key and server.
Each later POST is sent by the worker that receives it to the upstream's message endpoint, and
the answer to it is what the owner routes back (in memory when that worker is the owner): the
responses to its requests, with the progress notifications naming their tokens and the other
notifications that arrive meanwhile, as one event stream. Requests the upstream sends the agent
(sampling, elicitation, roots) go the same way (or, with no POST in flight, wait for the agent's
GET stream), or are refused at once if the agent did not declare the capability.

What comes back looks to the rest of the pipeline like an upstream's response
(``BridgedResponse``), so screening, pinning, the quota, usage events and logging apply unchanged.

A session ends on DELETE, after ``EXTERNAL_MCP_SESSION_IDLE_SECONDS`` without a request, when the
upstream ends its stream, or when its owner dies (its mark lapses): waiting requests end with
their unanswered ids reported, and later ones get 404, which tells an agent to start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from django.conf import settings

from external_mcp import legacy_sse, urlpolicy
from external_mcp.gateway import bridge_store, sessions, transport
from external_mcp.gateway.bridge_store import GONE, listening_box
from external_mcp.gateway.bridged import BridgedContent, BridgedResponse
from external_mcp.gateway.call import Call
from external_mcp.gateway.errors import (
    ProxyError,
    connection_failed,
    credentials_refused,
    invalid_answer,
    timed_out,
    upstream_error,
)
from external_mcp.gateway.sessions import StoreDown
from external_mcp.jsonrpc import dumps, error_body, error_response, id_key, is_request, parse_json
from external_mcp.proxy_cache import ServerInfo
from twinmcp.ids import random_hex

logger = logging.getLogger("external_mcp.proxy")

EVENT_STREAM = "text/event-stream"
CAPABILITY_OF = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}


def _ended(detail: str = "") -> BridgedResponse:
    """Per the spec, 404 to a request of an ended session tells the client to initialize again."""
    body = error_body(None, -32001, "The session ended (" + (detail or "ended or unknown")
                      + "); start a new one with initialize.")
    return BridgedResponse(404, content_type="application/json", body=body)


# -- the owner: the upstream's stream ------------------------------------------------------------


@dataclass
class Held:
    """An upstream stream this worker holds."""

    sid: str
    server: ServerInfo
    stream: legacy_sse.EventStream
    endpoint: str
    capabilities: dict[str, Any]
    scopes: list[str]
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    boxes: dict[str, asyncio.Queue[bytes]] = field(default_factory=dict, repr=False)
    """The boxes of requests waiting in this worker, oldest first: their answers skip the store."""
    requests: dict[str, str] = field(default_factory=dict, repr=False)
    tokens: dict[str, str] = field(default_factory=dict, repr=False)

    def box_of(self, *, request: str | None = None, token: str | None = None) -> str | None:
        """As ``bridge_store``'s, among this worker's waiting requests."""
        if request is not None:
            return self.requests.get(request)
        found = self.tokens.get(token) if token is not None else None
        return found or next(iter(self.boxes), None)


_held: dict[str, Held] = {}


def _scopes(server: ServerInfo) -> list[str]:
    return [f"open:server:{server.id}", f"open:workspace:{server.workspace_id}"]


def _signed_scope(server: ServerInfo) -> str:
    return f"sse:{server.id}"


async def _hold(held: Held) -> None:
    """Read the stream until it ends, routing each message; then end the session for everyone."""
    beat = asyncio.ensure_future(_beat(held))
    reason = "the upstream ended its event stream"
    try:
        while (message := await held.stream.next_message()) is not None:
            for item in message if isinstance(message, list) else [message]:
                await _route(held, item)
    except legacy_sse.StreamBroken as exc:
        reason = f"the upstream broke the HTTP+SSE transport: {exc}"
    except (aiohttp.ClientError, OSError):
        reason = "the upstream's event stream failed"
    except StoreDown:
        reason = "the session store became unreachable"
    except asyncio.CancelledError:
        reason = "the session was closed"
        raise
    finally:
        beat.cancel()
        held.stream.close()
        _held.pop(held.sid, None)
        logger.info("HTTP+SSE session of server %s ended: %s", held.server.id, reason)
        with contextlib.suppress(StoreDown):
            await _gone(held)


async def _gone(held: Held) -> None:
    for queue in held.boxes.values():
        queue.put_nowait(GONE)
    store = bridge_store.store()
    await store.closed(held.sid, held.scopes)
    for box in [*await store.boxes(held.sid), listening_box(held.sid)]:
        await store.deliver(box, GONE)
    await store.end(held.sid)


async def _beat(held: Held) -> None:
    """Keep the session's mark while the stream is held; end it when the session ended elsewhere."""
    while True:
        try:
            if not await bridge_store.store().beat(held.sid, held.scopes):
                break
        except StoreDown as exc:
            logger.warning("HTTP+SSE session of server %s: heartbeat not stored (%s)", held.server.id, exc)
        await asyncio.sleep(bridge_store.BEAT_SECONDS)
    if held.task is not None:
        held.task.cancel()


async def _route(held: Held, message: Any) -> None:
    if not isinstance(message, dict):
        return
    store = bridge_store.store()
    method = message.get("method")
    if isinstance(method, str) and "id" in message:
        needed = CAPABILITY_OF.get(method)
        if needed is None or needed not in held.capabilities:
            refusal = error_response(message["id"], -32601, f"The client did not declare the {needed or method} "
                                     "capability.", None)
            with contextlib.suppress(ProxyError):
                await _post(held.server, held.endpoint, dumps(refusal), random_hex())
            return
        # On the stream of the POST in flight (where SDK clients look for it), else the GET stream's.
        box: str | None = held.box_of() or await store.box_of(held.sid) or listening_box(held.sid)
    elif isinstance(method, str):
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        key = id_key(token) if token is not None else None
        box = (held.box_of(token=key) or await store.box_of(held.sid, token=key)
               or listening_box(held.sid))
    elif "id" in message:
        key = id_key(message["id"])
        box = held.box_of(request=key) or await store.box_of(held.sid, request=key)
    else:
        return
    if box in held.boxes:
        held.boxes[box].put_nowait(dumps(message))
    elif box is not None:
        await store.deliver(box, dumps(message))


async def open_stream(call: Call, server: ServerInfo, capabilities: Any) -> str:
    """Open the upstream's stream in this worker, learn its message endpoint; the new session id."""
    assert call.key is not None
    store = bridge_store.store()
    scopes = _scopes(server)
    for scope, limit in zip(scopes, (settings.EXTERNAL_MCP_SSE_MAX_STREAMS_PER_SERVER,
                                     settings.EXTERNAL_MCP_SSE_MAX_STREAMS_PER_WORKSPACE), strict=True):
        if await _store(store.open_count(scope)) >= limit:
            where = "this server" if scope.startswith("open:server") else "this workspace"
            raise ProxyError(503, -32027, f"{server.name}: TwinMCP holds as many HTTP+SSE sessions open for {where} "
                             f"as allowed ({limit}); try again later.", error_class="capacity")
    headers = {**server.auth_headers, **await transport.token_headers(server), "Accept": EVENT_STREAM,
               "X-Request-Id": call.request_id}
    timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
    with _failures(server):
        response = await transport.upstream_session().get(
            server.url, headers=headers, ssl=server.ssl, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=None))
    stream = legacy_sse.EventStream(response, max_event_bytes=settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES)
    sid = sessions.issue(call.key.key_id, _signed_scope(server))
    try:  # until the stream is held, any failure closes it
        endpoint = await _endpoint_of(server, stream, response)
        await _store(store.create(sid, {"server": str(server.id), "endpoint": endpoint}))
        await _store(store.beat(sid, scopes))
    except BaseException:
        stream.close()
        raise
    held = Held(sid=sid, server=server, stream=stream, endpoint=endpoint,
                capabilities=capabilities if isinstance(capabilities, dict) else {}, scopes=scopes)
    held.task = asyncio.ensure_future(_hold(held))
    _held[sid] = held
    return sid


async def _endpoint_of(server: ServerInfo, stream: legacy_sse.EventStream, response: aiohttp.ClientResponse) -> str:
    """The message endpoint the just opened stream names, or the ProxyError saying why there is none."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if response.status in (401, 403):
        raise credentials_refused(server, response.status)
    if response.status != 200 or kind != EVENT_STREAM:
        raise upstream_error(server, 502, -32018, f"the upstream did not open an HTTP+SSE event stream (HTTP "
                             f"{response.status}, {kind or 'no content type'}).", "protocol")
    timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
    try:
        async with asyncio.timeout(timeout_s):
            endpoint = await stream.endpoint(server.base_url)
        urlpolicy.validate_url(endpoint, resolve=False)
    except legacy_sse.StreamBroken as exc:
        raise invalid_answer(server, str(exc)) from None
    except urlpolicy.UrlPolicyError as exc:
        raise upstream_error(server, 502, -32012, "the upstream's message endpoint is refused by the URL policy.",
                             "policy", detail=str(exc)) from None
    except TimeoutError:
        raise timed_out(server, timeout_s) from None
    return endpoint


async def close_all() -> None:
    """At the end of the process: every held stream closed (their sessions end for every worker)."""
    tasks = [held.task for held in list(_held.values()) if held.task is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- an agent's request, on any worker ------------------------------------------------------------


async def forward(call: Call, headers: dict[bytes, bytes]) -> aiohttp.ClientResponse | BridgedResponse:
    """The upstream's response to the agent's request, over the transport the server speaks."""
    assert call.server is not None
    if call.server.legacy_sse:
        response = await send(call, headers)
        call.lap("upstream")  # the message posted and acknowledged; its answer is read by the relay
        return response
    return await transport.send(call, headers)


async def send(call: Call, headers: dict[bytes, bytes]) -> BridgedResponse:
    """The answer to an agent's request for an HTTP+SSE server, as an upstream response."""
    server, key = call.server, call.key
    assert server is not None and key is not None
    session_id = headers.get(b"mcp-session-id", b"").decode("latin-1")
    if not session_id:
        if call.method == "POST" and len(call.messages) == 1 and call.messages[0].get("method") == "initialize":
            params = call.messages[0].get("params")
            capabilities = params.get("capabilities") if isinstance(params, dict) else None
            session_id = await open_stream(call, server, capabilities)
            return await post(call, session_id, new=True)
        body = error_body(None, -32600, "Bad Request: an Mcp-Session-Id header is required; start with initialize.")
        return BridgedResponse(400 if call.method == "POST" else 405, content_type="application/json", body=body)
    if not sessions.signed_for(session_id, key.key_id, _signed_scope(server)):
        return _ended("unknown to this key and server")
    if call.method == "DELETE":
        await session_close(session_id)
        return BridgedResponse(200)
    if call.method == "GET":
        if await _store(bridge_store.store().load(session_id)) is None:
            return _ended()
        return BridgedResponse(200, content_type=EVENT_STREAM, feed=lambda content: _listen(content, session_id))
    return await post(call, session_id)


async def session_close(session_id: str) -> None:
    """End a session: its owner closes the stream (at once if it is this worker)."""
    await _store(bridge_store.store().end(session_id))
    held = _held.get(session_id)
    if held is not None and held.task is not None:
        held.task.cancel()


async def post(call: Call, session_id: str, *, new: bool = False) -> BridgedResponse:
    server = call.server
    assert server is not None
    store = bridge_store.store()
    record = await _store(store.load(session_id))
    if record is None:
        return _ended()
    requests = [m for m in call.messages if is_request(m)]
    ids = [id_key(m["id"]) for m in requests]
    tokens = [id_key(token) for m in requests if (token := _progress_token(m)) is not None]
    box = random_hex()
    if ids:
        await _expect(session_id, box, ids, tokens)
    try:
        status = await _post(server, record["endpoint"], call.body, call.request_id)
        if status == 404:
            await _settle(session_id, box, ids, tokens)
            await session_close(session_id)
            return _ended("the upstream no longer knows it")
        if status >= 400:
            raise upstream_error(server, 502, -32022, f"the upstream refused the message (HTTP {status}).", "http")
    except BaseException:
        await _settle(session_id, box, ids, tokens)
        raise
    if not ids:
        return BridgedResponse(202)
    return BridgedResponse(200, content_type=EVENT_STREAM, session_id=session_id if new else None,
                           feed=lambda content: _collect(content, session_id, box, ids, tokens))


async def open_upstream(call: Call, server: ServerInfo, initialize: dict[str, Any]) -> tuple[str, Any]:
    """For the aggregate endpoints: a session TwinMCP opens itself (its stream held here), initialized;
    the session id and the initialize result."""
    params = initialize.get("params")
    session_id = await open_stream(call, server, params.get("capabilities") if isinstance(params, dict) else None)
    try:
        answer = await request(server, session_id, initialize, call.request_id)
        if "error" in answer:
            raise upstream_error(server, 502, -32024, "the upstream did not open a session for TwinMCP (it answered "
                                 "initialize with an error).", "handshake")
        status = await _post(server, await _endpoint(server, session_id),
                             b'{"jsonrpc":"2.0","method":"notifications/initialized"}', call.request_id)
        if status >= 400:
            raise upstream_error(server, 502, -32024, f"the upstream did not open a session for TwinMCP (HTTP {status} "
                                 "to notifications/initialized).", "handshake")
    except BaseException:
        await session_close(session_id)
        raise
    return session_id, answer.get("result")


async def request(server: ServerInfo, session_id: str, message: dict[str, Any], request_id: str) -> dict[str, Any]:
    """One request of TwinMCP's own and its response (the notifications before it are not kept)."""
    endpoint = await _endpoint(server, session_id)
    key, box = id_key(message["id"]), random_hex()
    await _expect(session_id, box, [key], [])
    try:
        status = await _post(server, endpoint, dumps(message), request_id)
        if status >= 400:
            raise upstream_error(server, 502, -32022, f"the upstream refused the message (HTTP {status}).", "http")
        async with asyncio.timeout(settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000):
            async for data in _wait(session_id, box):
                if _is_response_to(data, {key}) is not None:
                    answer: dict[str, Any] = parse_json(data)
                    return answer
    except TimeoutError:
        raise timed_out(server, settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000) from None
    finally:
        await _settle(session_id, box, [key], [])
    raise upstream_error(server, 502, -32023, "the upstream's HTTP+SSE session ended before its response.",
                         "unanswered")


async def _endpoint(server: ServerInfo, session_id: str) -> str:
    record = await _store(bridge_store.store().load(session_id))
    if record is None:
        raise upstream_error(server, 502, -32023, "the upstream's HTTP+SSE session ended.", "unanswered")
    return record["endpoint"]


def _progress_token(message: dict[str, Any]) -> Any:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get("progressToken") if isinstance(meta, dict) else None


async def _post(server: ServerInfo, endpoint: str, body: bytes, request_id: str) -> int:
    """Send one message to the upstream's endpoint; its HTTP status (the answer comes on the stream)."""
    headers = {**server.auth_headers, **await transport.token_headers(server), "Content-Type": "application/json",
               "X-Request-Id": request_id}
    timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
    with _failures(server):
        async with transport.upstream_session().post(
                endpoint, data=body, headers=headers, ssl=server.ssl, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))) as response:
            await response.content.read(65536)  # an acknowledgement; what matters comes on the stream
            if response.status in (401, 403):
                raise credentials_refused(server, response.status)
            return response.status


@contextlib.contextmanager
def _failures(server: ServerInfo) -> Iterator[None]:
    """aiohttp's failures on the way to the upstream, as the gateway names them."""
    try:
        yield
    except urlpolicy.UrlPolicyError as exc:
        raise upstream_error(server, 502, -32012, "the upstream address is refused by the URL policy.", "policy",
                             detail=str(exc)) from None
    except TimeoutError:
        raise timed_out(server, settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000) from None
    except aiohttp.ClientError as exc:
        raise connection_failed(server, exc) from None


async def _collect(content: BridgedContent, session_id: str, box: str, ids: list[str], tokens: list[str]) -> None:
    """A POST's answer: what the owner routes to its box, until every request has its response
    (or the session ends: the relay then reports what went unanswered)."""
    waiting = set(ids)
    try:
        async for data in _wait(session_id, box):
            content.put(_event(data))
            answered = _is_response_to(data, waiting)
            if answered is not None:
                waiting.discard(answered)
                if not waiting:
                    return
    finally:
        await _settle(session_id, box, ids, tokens)


async def _listen(content: BridgedContent, session_id: str) -> None:
    """The agent's GET stream: the upstream's requests and the notifications no request waited for."""
    async for data in _wait(session_id, listening_box(session_id)):
        content.put(_event(data))


async def _expect(session_id: str, box: str, ids: list[str], tokens: list[str]) -> None:
    """Where the answers to these requests go: a box in this worker's memory when it holds the
    stream (always, with one worker), else one in the store for the owner to fill."""
    held = _held.get(session_id)
    if held is None:
        await _store(bridge_store.store().expect(session_id, box, ids, tokens))
        return
    held.boxes[box] = asyncio.Queue()
    held.requests.update(dict.fromkeys(ids, box))
    held.tokens.update(dict.fromkeys(tokens, box))


async def _settle(session_id: str, box: str, ids: list[str], tokens: list[str]) -> None:
    held = _held.get(session_id)
    if held is not None and held.boxes.pop(box, None) is not None:
        for key in ids:
            held.requests.pop(key, None)
        for key in tokens:
            held.tokens.pop(key, None)
        return
    with contextlib.suppress(StoreDown):
        await bridge_store.store().settle(session_id, box, ids, tokens)


async def _wait(session_id: str, box: str) -> AsyncIterator[bytes]:
    """What arrives in a box, until the session ends (its owner gone, the stream closed)."""
    held = _held.get(session_id)
    queue = held.boxes.get(box) if held is not None else None
    if queue is not None:  # filled by the owner in this worker, which puts GONE when it ends
        while (data := await queue.get()) != GONE:
            yield data
        return
    store = bridge_store.store()
    while True:
        data = await _store(store.take(box, bridge_store.TAKE_SECONDS))
        if data is None:
            if not await _store(store.alive(session_id)):
                return
            continue
        if data == GONE:
            return
        yield data


def _event(data: bytes) -> bytes:
    return b"event: message\ndata: " + data + b"\n\n"


async def _store(operation: Any) -> Any:
    try:
        return await operation
    except StoreDown as exc:
        raise ProxyError(503, -32028, "TwinMCP cannot reach its session store for HTTP+SSE servers; try again "
                         "shortly.", error_class="store", detail=str(exc)) from None


def _is_response_to(data: bytes, waiting: set[str]) -> str | None:
    try:
        message = parse_json(data)
    except ValueError:
        return None
    if isinstance(message, dict) and "id" in message and "method" not in message:
        key = id_key(message["id"])
        return key if key in waiting else None
    return None

