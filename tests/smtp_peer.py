"""A real SMTP server on 127.0.0.1 for tests: it refuses every connection while ``refusing`` is set
(``421``, as a mail server that is overloaded or down for maintenance answers) and accepts mail
otherwise, keeping what it received in ``messages``.

Small on purpose (the few commands Python's smtplib sends: EHLO/HELO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT) so the e-mail tests need no extra dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


@dataclass
class Mail:
    sender: str
    recipients: list[str] = field(default_factory=list)
    data: bytes = b""


class SmtpPeer:
    def __init__(self, *, refusing: bool = False) -> None:
        self.refusing = refusing
        self.messages: list[Mail] = []
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> SmtpPeer:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.run_until_complete(self._open())
            started.set()
            loop.run_until_complete(self._serve())
            loop.close()

        self._thread = threading.Thread(target=run, name="smtp-peer", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the SMTP peer did not start")
        return self

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._session, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self) -> None:
        assert self._stopping is not None and self._server is not None
        await self._stopping.wait()
        self._server.close()
        await self._server.wait_closed()

    def stop(self) -> None:
        if self._loop is None or self._stopping is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        self._loop = None

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            if self.refusing:
                await say("421 4.3.2 Service not available, closing the connection")
                return
            await say("220 localhost test SMTP peer")
            mail: Mail | None = None
            while line := await reader.readline():
                command = line.decode("latin-1").strip()
                verb = command[:4].upper()
                if verb == "EHLO":
                    await say("250-localhost")
                    await say("250 8BITMIME")
                elif verb in ("HELO", "NOOP", "RSET"):
                    mail = None if verb == "RSET" else mail
                    await say("250 OK")
                elif verb == "MAIL":
                    mail = Mail(sender=command.split(":", 1)[1].strip(" <>"))
                    await say("250 OK")
                elif verb == "RCPT" and mail is not None:
                    mail.recipients.append(command.split(":", 1)[1].strip(" <>"))
                    await say("250 OK")
                elif verb == "DATA" and mail is not None:
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    lines = []
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        lines.append(data)
                    mail.data = b"".join(lines)
                    self.messages.append(mail)
                    mail = None
                    await say("250 OK queued")
                elif verb == "QUIT":
                    await say("221 Bye")
                    return
                else:
                    await say("502 Command not implemented")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
