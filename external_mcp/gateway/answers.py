"""What of an upstream's answer may reach the agent, and what it answered, for the usage events.

An upstream is hostile input (design.md §9). Of what it sends, the agent receives only:
JSON-RPC responses to ids this request sent, each once (a ``tools/list`` result keeps only the
approved tools and is always re-serialised, so the agent reads exactly what was checked);
requests and notifications the server addresses to the client; and SSE events without data
(priming events, keep-alives). Everything else is dropped, and ``problem`` says why, for the
error the agent gets if its request is left unanswered. An SDK client routes responses by id
across all its streams, so a response to an id this request did not send is never forwarded:
it could be a ``tools/list`` answer smuggled past the filter.

A GET stream is not tied to a request: it may replay responses to earlier POSTs after a
resumption (``Last-Event-ID``), so there every response is forwarded, and any result that
carries a ``tools`` list is filtered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from external_mcp import sse
from external_mcp.jsonrpc import dumps, error_code, id_key, is_request, is_response, parse_json
from usage.events import Reply

LIST_CHANGED = "notifications/tools/list_changed"


class InvalidAnswer(Exception):
    """The answer cannot be given to the agent; the message completes "the upstream's answer …"."""


class Screen:
    def __init__(self, requests: Sequence[dict[str, Any]], allowed: Callable[[dict[str, Any]], bool], *,
                 replay: bool = False, outgoing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 incoming: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.allowed = allowed
        self.replay = replay
        self.outgoing = outgoing
        self.incoming = incoming
        self.pending: dict[str, Any] = {id_key(m["id"]): m["id"] for m in requests if is_request(m)}
        self.lists = {id_key(m["id"]) for m in requests if is_request(m) and m["method"] == "tools/list"}
        self.replies: dict[str, Reply] = {}
        self.problem = ""
        self.list_changed = False
        self.resumable = False

    @property
    def unanswered(self) -> list[Any]:
        return list(self.pending.values())

    # --- a JSON answer: one message, or one batch ----------------------------------------------------------

    def json_answer(self, body: bytes) -> bytes:
        """The body to send the agent. Raises InvalidAnswer unless every request is answered."""
        if not body.strip():
            raise InvalidAnswer("is empty")
        try:
            data = parse_json(body)
        except ValueError as exc:
            raise InvalidAnswer(f"is {exc}") from None
        kept, changed = self._screen(data, body)
        if self.pending:
            detail = f"; {self.problem}" if self.problem else ""
            raise InvalidAnswer(f"has no response to id {_shown(self.unanswered[0])}{detail}")
        if not changed:
            return body
        return dumps(kept if isinstance(data, list) else kept[0])

    # --- an event stream, one event at a time -------------------------------------------------------------

    def event(self, event: sse.Event) -> bytes:
        """The bytes to forward for this event (empty: nothing)."""
        if event.event_id:
            self.resumable = True
        if event.data is None or not event.data.strip():
            return event.raw
        try:
            data = parse_json(event.data)
        except ValueError as exc:
            self.problem = f"it sent an event that is {exc}"
            return event.with_data(None)
        kept, changed = self._screen(data, event.data)
        if not changed:
            return event.raw
        if not kept:
            return event.with_data(None)
        return event.with_data(dumps(kept if isinstance(data, list) else kept[0]))

    # --- one message --------------------------------------------------------------------------------------

    def _screen(self, data: Any, raw: bytes) -> tuple[list[Any], bool]:
        batch = isinstance(data, list)
        kept: list[Any] = []
        changed = False
        for message in data if batch else [data]:
            out = self._message(message, None if batch else raw)
            changed = changed or out is not message
            if out is not None:
                kept.append(out)
        return kept, changed

    def _message(self, message: Any, raw: bytes | None) -> Any:
        if isinstance(message, dict) and isinstance(message.get("method"), str):
            if message["method"] == LIST_CHANGED:
                self.list_changed = True
            if self.outgoing is not None and "id" in message:
                return self.outgoing(message)
            return message  # a request or a notification from the server to the client
        if not is_response(message):
            self.problem = "it sent something that is not a JSON-RPC message"
            return None
        if self.replay:
            return filter_tools(message, self.allowed) or message
        key = id_key(message["id"])
        if key not in self.pending:
            self.problem = "it sent a response to an id this request did not send"
            return None
        del self.pending[key]
        if key in self.lists:
            message = self._filter(message)
            raw = None
        if self.incoming is not None:
            message = self.incoming(message)
            raw = None
        raw = raw if raw is not None else dumps(message)
        self.replies[key] = Reply(error_code(message), len(raw), raw)
        return message

    def _filter(self, message: dict[str, Any]) -> dict[str, Any]:
        # Always a copy, so always re-serialised: the agent reads exactly what was filtered.
        return filter_tools(message, self.allowed) or dict(message)


def filter_tools(message: Any, allowed: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The message with only approved tools if its result carries a ``tools`` list, else None."""
    result = message.get("result") if isinstance(message, dict) else None
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list):
        return None
    approved = [t for t in tools if isinstance(t, dict) and allowed(t)]
    return {**message, "result": {**result, "tools": approved}}


def error_body(body: bytes, kind: str, allowed: Callable[[dict[str, Any]], bool]) -> bytes:
    """The body of an error status (or of a DELETE's answer) as the upstream sent it, except
    that no tools list in it escapes the filter, whatever a client does with such a body."""
    if kind == "text/event-stream":
        screen = Screen([], allowed, replay=True)
        parser = sse.Parser()
        events = parser.feed(body)
        events.extend(parser.close()[0])
        return b"".join(screen.event(event) for event in events)
    if b'"tools"' not in body and b"\\u" not in body:
        return body  # a JSON "tools" key is spelt either way: as is, or with \u escapes
    try:
        data = parse_json(body)
    except ValueError:
        return b""  # a tools list TwinMCP cannot read is one it cannot filter
    items = data if isinstance(data, list) else [data]
    filtered = [filter_tools(item, allowed) or item for item in items]
    return dumps(filtered if isinstance(data, list) else filtered[0])


def _shown(request_id: Any) -> str:
    text = dumps(request_id).decode()
    return text if len(text) <= 40 else text[:37] + "..."
