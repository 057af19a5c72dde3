"""Server-sent events, parsed incrementally (WHATWG HTML, "interpreting an event stream").

One parser for every reader of an MCP event stream: the proxy forwards each event the moment
its blank line arrives (progress streams through) and needs both its exact bytes and its data;
the MCP client reads whole bodies. Lines end with CRLF, LF or a lone CR; a CR that ends a chunk
may be the first half of a CRLF, so it waits for the next chunk. Scanning resumes where the last
chunk ended, so a long event arriving in many chunks costs one pass, not one per chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(Exception):
    """One event grew past the parser's bound before its blank line arrived."""


@dataclass(frozen=True)
class Event:
    raw: bytes
    """The event's bytes as received, its blank line included."""
    data: bytes | None
    """The data lines joined with LF; None when the event has no data field."""
    event_id: bytes | None
    fields: tuple[bytes, ...]
    """Every line that is not a data line (id, event, retry, comments), as received."""
    kind: bytes = b"message"
    """The event's type: its last ``event`` field, ``message`` without one."""

    def with_data(self, data: bytes | None) -> bytes:
        """The event with its data replaced (None: no data line), its other lines kept."""
        lines = [*self.fields, *(() if data is None else (b"data: " + data,))]
        return b"".join(line + b"\n" for line in lines) + b"\n" if lines else b""


class Parser:
    def __init__(self, *, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._event_start = 0
        self._line_start = 0
        self._scanned = 0
        self._reset()

    def _reset(self) -> None:
        self._data: list[bytes] = []
        self._has_data = False
        self._event_id: bytes | None = None
        self._kind = b"message"
        self._fields: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """The events this chunk completes. Raises EventTooLarge."""
        self._buffer += chunk
        events = self._scan(final=False)
        if self.max_event_bytes is not None and len(self._buffer) > self.max_event_bytes:
            raise EventTooLarge
        return events

    def close(self) -> tuple[list[Event], Event | None]:
        """At the end of the stream: the events a last lone CR completes, and the unfinished
        event if the stream stopped inside one (a reader must not act on it as if complete)."""
        events = self._scan(final=True)
        pending: Event | None = None
        if len(self._buffer) > self._event_start:
            tail = bytes(self._buffer[self._line_start:])
            if tail:
                self._line(tail)
            pending = self._dispatch(bytes(self._buffer[self._event_start:]))
        self._buffer.clear()
        self._event_start = self._line_start = self._scanned = 0
        return events, pending

    def _scan(self, *, final: bool) -> list[Event]:
        buffer = self._buffer
        end = len(buffer)
        events: list[Event] = []
        position = max(self._line_start, self._scanned)
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                self._scanned = end
                break
            if not final and match.end() == end and match.group() == b"\r":
                self._scanned = match.start()  # maybe half a CRLF: look again with the next chunk
                break
            line = bytes(buffer[self._line_start:match.start()])
            position = self._line_start = match.end()
            if line:
                self._line(line)
            else:
                events.append(self._dispatch(bytes(buffer[self._event_start:position])))
                self._event_start = position
        if self._event_start:
            del buffer[:self._event_start]
            self._line_start -= self._event_start
            self._scanned -= self._event_start
            self._event_start = 0
        return events

    def _line(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
            return
        if name == b"id" and b"\0" not in value:
            self._event_id = value
        elif name == b"event":
            self._kind = value or b"message"
        self._fields.append(line)

    def _dispatch(self, raw: bytes) -> Event:
        event = Event(raw=raw, data=b"\n".join(self._data) if self._has_data else None, event_id=self._event_id,
                      fields=tuple(self._fields), kind=self._kind)
        self._reset()
        return event


def data_of(payload: bytes) -> list[str]:
    """The data of each event of a whole SSE body, an unfinished last event included (a reader
    of a complete body can still use it)."""
    parser = Parser()
    events = parser.feed(payload)
    closing, pending = parser.close()
    events.extend(closing)
    if pending is not None:
        events.append(pending)
    return [event.data.decode("utf-8", "replace") for event in events if event.data is not None]
