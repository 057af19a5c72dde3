"""A real SMTP server on 127.0.0.1 for tests: it refuses every connection while ``refusing`` is set
(``421``, as a mail server that is overloaded or down for maintenance answers) and accepts mail
otherwise, keeping what it received in ``messages``.

Small on purpose (the few commands Python's smtplib sends: EHLO/HELO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT) so the e-mail tests need no extra dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from tests.loopback_server import LoopbackServer


@dataclass
class Mail:
    sender: str
    recipients: list[str] = field(default_factory=list)
    data: bytes = b""


class SmtpPeer(LoopbackServer):
    name = "SMTP peer"

    def __init__(self, *, refusing: bool = False) -> None:
        super().__init__()
        self.refusing = refusing
        self.messages: list[Mail] = []
        self.connections = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
