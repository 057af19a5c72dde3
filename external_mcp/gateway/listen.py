"""The aggregate endpoints' own event streams: a handshake-era agent's GET stream and a 2026-07-28
agent's ``subscriptions/listen``. TwinMCP, not an upstream, is the server there: it sends
``notifications/tools/list_changed`` when what the endpoint lists changed, which it learns from
the cache flushes every gateway process receives (``twinmcp.invalidation``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from external_mcp.gateway.call import Call, Receive, Send
from external_mcp.gateway.errors import client_disconnected
from external_mcp.jsonrpc import dumps
from external_mcp.served_catalog import View
from twinmcp import invalidation

KEEPALIVE_SECONDS = 25.0
LIST_CHANGED = "notifications/tools/list_changed"

_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def _wake() -> None:
    for loop, event in list(_waiters):
        loop.call_soon_threadsafe(event.set)


invalidation.on_flush(_wake)


def event(message: dict[str, object]) -> bytes:
    return b"event: message\ndata: " + dumps(message) + b"\n\n"


async def stream(call: Call, send: Send, receive: Receive, reload: Callable[[], Awaitable[View | None]],
                 headers: list[tuple[bytes, bytes]], *, first: bytes = b"",
                 notification: dict[str, object] | None = None) -> None:
    """Holds the stream open until the agent leaves or the endpoint disappears; a comment line
    every ``KEEPALIVE_SECONDS`` keeps intermediaries from closing it."""
    view = await reload()
    digest = view.digest if view is not None else ""
    changed = event(notification or {"jsonrpc": "2.0", "method": LIST_CHANGED})
    call.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *headers]})
    call.response_started = call.streaming = True
    if first:
        await send({"type": "http.response.body", "body": first, "more_body": True})
    flushed = asyncio.Event()
    entry = (asyncio.get_running_loop(), flushed)
    _waiters.add(entry)
    disconnect = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        while view is not None:
            waiter = asyncio.ensure_future(flushed.wait())
            done, _ = await asyncio.wait({waiter, disconnect}, timeout=KEEPALIVE_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if disconnect in done:
                waiter.cancel()
                raise client_disconnected()
            if waiter not in done:
                waiter.cancel()
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                continue
            flushed.clear()
            view = await reload()
            if view is None or view.digest != digest:
                digest = view.digest if view is not None else ""
                await send({"type": "http.response.body", "body": changed, "more_body": True})
    finally:
        _waiters.discard(entry)
        disconnect.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
