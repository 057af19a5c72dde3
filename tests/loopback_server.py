"""A raw TCP server on 127.0.0.1 in its own thread and event loop, for test peers that speak a
protocol byte by byte (the hostile MCP upstream, the SMTP server): subclasses answer each
connection in ``session``; ``stop()`` cancels the sessions still running."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

LOOPBACK = "127.0.0.1"
# Only a broken start or stop takes that long, even on a loaded machine.
DEADLINE_S = 30


class LoopbackServer:
    name = "loopback-server"

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_until_complete(self._serve())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not started.wait(DEADLINE_S):
            raise RuntimeError(f"the {self.name} did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._stopping is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(DEADLINE_S)
        if self._thread.is_alive():
            raise RuntimeError(f"the {self.name} did not stop within {DEADLINE_S} s")
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._tracked, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self.session(reader, writer)
        finally:
            self._sessions.discard(task)

    async def _serve(self) -> None:
        assert self._stopping is not None and self._server is not None
        await self._stopping.wait()
        self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        await self._server.wait_closed()
