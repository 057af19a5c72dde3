"""What the HTTP+SSE bridge hands the relay: an answer shaped like the part of
``aiohttp.ClientResponse`` the relay reads (status, headers, a body read as it arrives), so an
HTTP+SSE server's answers pass through the same screening, quota, usage and logging code as any
other server's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy


class BridgedContent:
    """What ``relay`` reads as a response body: chunks as they are put, ``b""`` at the end."""

    def __init__(self) -> None:
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._ended = False

    def put(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.put_nowait(chunk)

    def end(self) -> None:
        self._chunks.put_nowait(b"")

    async def readany(self) -> bytes:
        if self._ended:
            return b""
        chunk = await self._chunks.get()
        self._ended = not chunk
        return chunk

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def read_nowait(self) -> bytes:
        ready: list[bytes] = []
        while not self._ended and not self._chunks.empty():
            chunk = self._chunks.get_nowait()
            self._ended = not chunk
            ready.append(chunk)
        return b"".join(ready)


class BridgedResponse:
    """The part of ``aiohttp.ClientResponse`` the relay uses, for an answer the bridge composes."""

    def __init__(self, status: int, *, content_type: str = "", body: bytes = b"", session_id: str | None = None,
                 feed: Callable[[BridgedContent], Coroutine[Any, Any, None]] | None = None) -> None:
        self.status = status
        headers: CIMultiDict[str] = CIMultiDict()
        if content_type:
            headers["Content-Type"] = content_type
        if session_id:
            headers["Mcp-Session-Id"] = session_id
        self.headers = CIMultiDictProxy(headers)
        self.content = BridgedContent()
        self.content_length: int | None = None
        self._feeder: asyncio.Task[None] | None = None
        if feed is not None:
            self._feeder = asyncio.ensure_future(self._run(feed(self.content)))
        else:
            self.content_length = len(body)
            self.content.put(body)
            self.content.end()

    async def _run(self, feed: Coroutine[Any, Any, None]) -> None:
        try:
            await feed
        finally:
            self.content.end()

    def release(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()

    close = release

    async def __aenter__(self) -> BridgedResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
