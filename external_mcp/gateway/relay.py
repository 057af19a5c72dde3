"""What of the upstream's answer reaches the agent, and how: a JSON answer read whole and
screened before a byte is sent; an event stream forwarded event by event as it arrives; an
error status passed back with any tools list in it filtered (``answers.py`` decides what passes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from django.conf import settings

from external_mcp import metrics, sse
from external_mcp.gateway import answers, quota
from external_mcp.gateway.answers import InvalidAnswer, Screen
from external_mcp.gateway.call import Call, Receive, Send
from external_mcp.gateway.errors import (
    client_disconnected,
    connection_failed,
    credentials_refused,
    invalid_answer,
    timed_out,
    too_large,
    truncated,
    unanswered,
    upstream_error,
)
from external_mcp.gateway.transport import read_whole
from external_mcp.proxy_cache import ServerInfo, pinned, tool_refusal
from external_mcp.queue import queue_check
from usage.models import Endpoint, Outcome

logger = logging.getLogger("external_mcp.proxy")

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
SESSION_ID_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")
HEADER_VALUE_RE = re.compile(r"^[\x20-\x7e]{1,256}$")

_checks_queued: dict[Any, float] = {}


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


async def answer(call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send,
                 extra: list[tuple[bytes, bytes]]) -> None:
    """The upstream's answer to the agent: refused statuses as errors, error statuses passed back
    (filtered), an event stream relayed, a JSON answer screened whole; ``extra`` are the quota headers."""
    server = call.server
    assert server is not None
    call.upstream_status = status = response.status
    content_type = response.headers.get("Content-Type", "")
    kind = content_type.split(";")[0].strip().lower()
    if status in (401, 403):
        raise credentials_refused(server, status)
    if 300 <= status < 400:
        raise upstream_error(server, 502, -32017, "the upstream answered with a redirect, which is not followed.",
                             "redirect")
    out_headers = [(b"x-request-id", call.request_id.encode()), *extra]
    session_id = response.headers.get("Mcp-Session-Id")
    if call.endpoint != Endpoint.SERVER:
        if call.own_session:
            out_headers.append((b"mcp-session-id", call.own_session.encode()))
    elif session_id is not None:
        if SESSION_ID_RE.fullmatch(session_id):
            out_headers.append((b"mcp-session-id", session_id.encode()))
        elif status < 400:
            raise invalid_answer(server, "carries an invalid session id (visible ASCII expected)")
    if status >= 400 or call.method == "DELETE":
        await pass_through(call, response, out_headers, content_type)
        return
    call.screen = Screen(call.messages, approved_by(server), replay=call.method == "GET", outgoing=call.outgoing,
                         incoming=call.incoming)
    if call.method == "POST" and not call.screen.pending:
        # Notifications and responses only: the spec's answer is 202 and no body; a body is not read.
        call.status = 202
        call.reply_headers = out_headers
        return
    if call.method == "POST" and (status in (202, 204) or response.content_length == 0):
        raise invalid_answer(server, f"is empty (HTTP {status}) where a response was expected")
    if kind == EVENT_STREAM:
        await stream(call, response, receive, send, [*out_headers, _content_type(content_type, EVENT_STREAM),
                                                     (b"cache-control", b"no-cache")])
        return
    if kind == JSON and call.method == "POST":
        body = await read_whole(call, response)
        try:
            call.reply = call.screen.json_answer(body)
        except InvalidAnswer as exc:
            raise invalid_answer(server, str(exc)) from None
        call.status = status
        call.reply_headers = [*out_headers, _content_type(content_type, JSON)]
        return
    expected = "an event stream" if call.method == "GET" else "JSON or an event stream"
    raise upstream_error(server, 502, -32018, f"the upstream answered with content type {kind or '(none)'!r}; "
                         f"expected {expected}.", "protocol")


async def pass_through(call: Call, response: aiohttp.ClientResponse, out_headers: list[tuple[bytes, bytes]],
                       content_type: str) -> None:
    """An error status (or a DELETE's answer) goes back as the upstream sent it: read whole, not parsed."""
    status = response.status
    if status >= 400:
        call.outcome = Outcome.ERROR
        if status >= 500:
            metrics.ERRORS.labels(call.server_label, "proxy", "http").inc()
        else:
            await quota.refund(call)
    body = await read_whole(call, response)
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


async def stream(call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send,
                 headers: list[tuple[bytes, bytes]]) -> None:
    """Forward SSE events as they arrive; stop on client disconnect, an idle GET stream or a
    failure (then ``settle`` ends the stream with an error event for each unanswered request)."""
    call.status = response.status
    await send({"type": "http.response.start", "status": call.status, "headers": headers})
    call.response_started = call.streaming = True
    disconnect = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        pumping = asyncio.ensure_future(pump(call, response, send))
        done, _ = await asyncio.wait({pumping, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if pumping not in done:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            if call.method == "GET" or (call.screen is not None and call.screen.pending):
                raise client_disconnected()
        else:
            pumping.result()
    finally:
        disconnect.cancel()


async def pump(call: Call, response: aiohttp.ClientResponse, send: Send) -> None:
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
            await forward_events(call, parser.feed(chunk), send)
            if post and not screen.pending:
                # Every request is answered: the stream is done (the spec lets the server close
                # it now); what already arrived goes along, nothing more is waited for.
                with contextlib.suppress(aiohttp.ClientError, sse.EventTooLarge):
                    await forward_events(call, parser.feed(response.content.read_nowait()), send)
                return
        closing, unfinished = parser.close()
        await forward_events(call, closing, send)
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


async def forward_events(call: Call, events: list[sse.Event], send: Send) -> None:
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


def _content_type(upstream: str, default: str) -> tuple[bytes, bytes]:
    return b"content-type", (upstream if HEADER_VALUE_RE.fullmatch(upstream) else default).encode()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
