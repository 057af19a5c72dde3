"""The HTTP+SSE transport of protocol 2024-11-05, as its client speaks it.

The client opens ``GET <url>`` and keeps the event stream; its first event, ``endpoint``, names
the URL the client POSTs its JSON-RPC messages to (usually with a session id in the query), and
every message of the server, responses included, comes back as a ``message`` event on the stream.
The spec deprecates the transport; servers built on it remain deployed.

Everything here holds for any bytes a server sends: an event is bounded, the endpoint must stay
on the stream's origin (the URL policy applies again when connecting), and a broken rule is a
``StreamBroken`` whose text an admin can act on.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from external_mcp import sse

ENDPOINT_MAX_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}


class StreamBroken(Exception):
    """The server broke the transport's rules; the text says how."""


def message_url(stream_url: str, data: bytes | None) -> str:
    """The ``endpoint`` event's URI resolved against the stream's URL: on the same origin only, so
    a server cannot send TwinMCP's requests, and the credentials they carry, anywhere else."""
    try:
        text = (data or b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        raise StreamBroken("its endpoint event is not UTF-8 text") from None
    if not text or len(text) > ENDPOINT_MAX_CHARS or any(ch.isspace() or ord(ch) < 0x20 for ch in text):
        raise StreamBroken("its endpoint event does not hold a URL")
    try:
        resolved = urlsplit(urljoin(stream_url, text))
        base = urlsplit(stream_url)
        same = (resolved.scheme == base.scheme and resolved.hostname == base.hostname
                and _port(resolved.scheme, resolved.port) == _port(base.scheme, base.port))
    except ValueError:
        raise StreamBroken("its endpoint event does not hold a URL") from None
    if not same or resolved.username is not None or resolved.password is not None:
        raise StreamBroken("its endpoint event names another origin than the stream's; TwinMCP posts only to the "
                           "server's own origin")
    return urlunsplit((resolved.scheme, resolved.netloc, resolved.path or "/", resolved.query, ""))


def _port(scheme: str, port: int | None) -> int | None:
    return port or DEFAULT_PORTS.get(scheme)


class EventStream:
    """One open stream's events in order: the endpoint first, then the server's messages."""

    def __init__(self, response: aiohttp.ClientResponse, *, max_event_bytes: int) -> None:
        self.response = response
        self._parser = sse.Parser(max_event_bytes=max_event_bytes)
        self._ready: deque[sse.Event] = deque()
        self._ended = False

    async def next_event(self) -> sse.Event | None:
        """The next complete event; None once the stream has ended (an event cut short is dropped).
        Raises ``StreamBroken`` for an event over the bound."""
        while not self._ready:
            if self._ended:
                return None
            chunk = await self.response.content.readany()
            try:
                if chunk:
                    self._ready.extend(self._parser.feed(chunk))
                else:
                    self._ended = True
                    self._ready.extend(self._parser.close()[0])
            except sse.EventTooLarge:
                raise StreamBroken(f"it sent an event over {self._parser.max_event_bytes} bytes") from None
        return self._ready.popleft()

    async def endpoint(self, stream_url: str) -> str:
        """The message URL from the stream's first event (comments and keep-alives before it skipped)."""
        while True:
            event = await self.next_event()
            if event is None:
                raise StreamBroken("its event stream ended before the endpoint event")
            if event.data is None and event.kind == b"message":
                continue
            if event.kind != b"endpoint":
                raise StreamBroken("the first event of its stream is not the endpoint event (is this an HTTP+SSE "
                                   "server's event stream URL?)")
            return message_url(stream_url, event.data)

    async def next_message(self) -> Any:
        """The next JSON-RPC message (any JSON value; the caller judges it); None at the end."""
        while True:
            event = await self.next_event()
            if event is None:
                return None
            if event.kind != b"message" or event.data is None or not event.data.strip():
                continue
            try:
                return json.loads(event.data)
            except (ValueError, RecursionError):
                raise StreamBroken("a message event's data is not JSON") from None

    def close(self) -> None:
        """Ends the stream: for this transport, the end of the session."""
        self.response.close()
