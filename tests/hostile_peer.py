"""A hostile MCP upstream for tests: a raw TCP server on 127.0.0.1 that answers with exactly
the bytes a test scripts.

The SDK peers in ``tests/mcp_peers.py`` sit on uvicorn, which keeps HTTP honest: it will not
cut a body short of its Content-Length, stall between two bytes or keep a connection open
without answering. A registered server can turn hostile (design.md §9), so the guarantees
(only approved tools reach agents, every executed call is recorded, failures never look like
success) are tested against a peer that does all of that on purpose.

A peer is a handler ``(HostileRequest) -> Iterable[Step]`` where a step is ``bytes`` (written
and flushed), :class:`Sleep`, :class:`Close` (an abrupt close) or :class:`Hang` (stay silent
until the client gives up or the peer stops). :func:`mcp_handler` speaks just enough MCP
(stateless ``server/discover``, ``tools/list``, ``tools/call``) for health checks and the proxy,
and each of its answers can be replaced by hostile bytes::

    def tools_list(request):
        return json_answer({"jsonrpc": "2.0", "id": request.rpc_id, "result": {"tools": [...]}})

    with HostilePeer(mcp_handler(tools_list=tools_list)) as peer:
        ...  # register peer.url, check it, proxy through it

Every answer carries ``Connection: close``: one request per connection, so a script can end a
body by closing. The peer only ever binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from tests.loopback_server import LOOPBACK, LoopbackServer

__all__ = [
    "Close",
    "Hang",
    "HostilePeer",
    "HostileRequest",
    "Sleep",
    "Step",
    "chunked",
    "http_head",
    "json_answer",
    "mcp_handler",
    "rpc_result",
    "sse_answer",
    "sse_event",
]

MODERN_VERSION = "2026-07-28"
MAX_HEADER_BYTES = 65536


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Close:
    """Close the connection at once, wherever the answer is."""


@dataclass(frozen=True)
class Hang:
    """Send nothing more and keep the connection open until the client leaves or the peer stops."""


Step = bytes | Sleep | Close | Hang
Handler = Callable[["HostileRequest"], Iterable[Step]]


@dataclass
class HostileRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def rpc_method(self) -> str | None:
        data = self.json
        return data.get("method") if isinstance(data, dict) else None

    @property
    def rpc_id(self) -> Any:
        data = self.json
        return data.get("id") if isinstance(data, dict) else None


def http_head(status: int = 200, *, content_type: str | None = "application/json", length: int | None = None,
              headers: dict[str, str] | None = None) -> bytes:
    """A status line and headers. ``length=None`` sends no Content-Length: the body ends when
    the connection closes (or is chunked, if the caller says so in ``headers``)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_answer(payload: Any, *, status: int = 200, length: int | None = -1) -> list[Step]:
    """A JSON answer. ``payload`` may be raw bytes (sent as they are) or any JSON value.
    ``length=-1`` declares the true length; another number declares that one instead."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
    declared = len(body) if length == -1 else length
    return [http_head(status, length=declared), body]


def sse_event(data: Any, *, event_id: str | None = None) -> bytes:
    text = data.decode() if isinstance(data, bytes) else data if isinstance(data, str) else json.dumps(data)
    prefix = f"id: {event_id}\n" if event_id is not None else ""
    return (prefix + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def sse_answer(*events: Any, status: int = 200) -> list[Step]:
    """An SSE answer, ended by closing the connection after the last event."""
    return [http_head(status, content_type="text/event-stream"), *(sse_event(e) for e in events)]


def chunked(*pieces: bytes) -> bytes:
    """Pieces in chunked transfer coding, with the terminating zero-size chunk."""
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces if p) + b"0\r\n\r\n"


def rpc_result(request: HostileRequest, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request.rpc_id, "result": result}


def _default_tools_list(request: HostileRequest) -> list[Step]:
    tool = {"name": "echo", "description": "Echo.", "inputSchema": {"type": "object"}}
    return json_answer(rpc_result(request, {"tools": [tool]}))


def _default_call(request: HostileRequest) -> list[Step]:
    return json_answer(rpc_result(request, {"content": [{"type": "text", "text": "ok"}], "isError": False}))


def mcp_handler(*, tools_list: Handler | None = None, tools_call: Handler | None = None,
                other: Handler | None = None, discover: Handler | None = None) -> Handler:
    """A stateless (2026-07-28) MCP server whose ``tools/list`` and ``tools/call`` answers are the
    given handlers' bytes. Discovery documents are 404, notifications 202; ``other`` answers any
    other JSON-RPC method (default: an empty result); ``discover`` replaces the ``server/discover``
    answer (default: a well-formed one)."""

    def handle(request: HostileRequest) -> Iterable[Step]:
        if request.method != "POST":
            return [http_head(404, length=0)]
        method = request.rpc_method
        if method == "server/discover" and discover is not None:
            return discover(request)
        if method == "server/discover":
            info = {"io.modelcontextprotocol/serverInfo": {"name": "hostile", "version": "6.6.6"}}
            return json_answer(rpc_result(request, {"supportedVersions": [MODERN_VERSION],
                                                    "capabilities": {"tools": {}}, "_meta": info}))
        if method == "tools/list":
            return (tools_list or _default_tools_list)(request)
        if method == "tools/call":
            return (tools_call or _default_call)(request)
        if request.rpc_id is None:
            return [http_head(202, content_type=None, length=0)]
        if other is not None:
            return other(request)
        return json_answer(rpc_result(request, {}))

    return handle


class HostilePeer(LoopbackServer):
    """The server: its own thread and event loop; ``requests`` records what it received."""

    name = "hostile peer"

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[HostileRequest] = []

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def requests_to(self, rpc_method: str) -> list[HostileRequest]:
        return [r for r in list(self.requests) if r.rpc_method == rpc_method]

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            for step in self.handler(request):
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, Close):
                    break
                elif isinstance(step, Hang):
                    await reader.read()  # until the client closes
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> HostileRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > MAX_HEADER_BYTES:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    return HostileRequest(method=method, path=target.split("?", 1)[0], headers=headers, body=body)
