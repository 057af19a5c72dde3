"""The usage events of one proxied request: one row per JSON-RPC message, for ``recorder.py``.

The gateway says what happened to each message; this module turns it into ``UsageEvent``
fields, so what a row means (its outcome, its tokens, whether it counts) is decided in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db.backends.base.operations import BaseDatabaseOperations

from usage.models import Outcome
from usage.tokens import token_counter

# A JSON-RPC code is any integer; the column keeps those its type holds (the row is kept either way).
_CODE_MIN, _CODE_MAX = BaseDatabaseOperations.integer_field_ranges["IntegerField"]


@dataclass(frozen=True)
class Reply:
    """One response the agent received: what the usage event records about it."""

    error_code: int | None
    size: int
    raw: bytes


@dataclass(frozen=True)
class Sent:
    """One JSON-RPC message the gateway forwarded (or a whole GET or DELETE), and its fate."""

    method: str
    tool: str
    jsonrpc_id: str
    """The id as text: a string id as it is, any other as its JSON (``7``, ``null``); empty when
    the message has none (a notification, a GET or DELETE)."""
    raw: bytes
    counted: bool
    reply: Reply | None
    """The response that reached the agent; None when none did (or none was due)."""


def proxied_rows(*, base: dict[str, Any], sent: Sequence[Sent], outcome: str, error_code: int | None,
                 status: int, bytes_out: int) -> list[dict[str, Any]]:
    """``UsageEvent`` fields for each message. A message the agent got a response to has that
    response's outcome; the others share the request's (``outcome``, ``error_code``: an OK
    request answered with an HTTP error status is an error). Bytes the upstream sent for no
    response in particular are shared evenly."""
    counter = token_counter()
    share_out = bytes_out // max(1, len(sent))
    rows: list[dict[str, Any]] = []
    for message in sent:
        reply = message.reply
        if reply is not None:
            code = reply.error_code
            message_outcome = Outcome.OK if code is None else Outcome.ERROR
        else:
            code = error_code
            message_outcome = outcome
            if message_outcome == Outcome.OK and (code is not None or status >= 400):
                message_outcome = Outcome.ERROR
        raw_out = reply.raw if reply is not None else b""
        size_out = reply.size if reply is not None else share_out
        rows.append({
            **base, "method": storable_text(message.method, 100), "tool_name": storable_text(message.tool, 200),
            "jsonrpc_id": storable_text(message.jsonrpc_id, 100),
            "tokens_in": counter.count(message.raw) if message.raw else 0,
            "tokens_out": counter.count(raw_out) if raw_out else (size_out + 3) // 4,
            "bytes_in": len(message.raw), "bytes_out": size_out,
            "jsonrpc_error_code": code if code is not None and _CODE_MIN <= code <= _CODE_MAX else None,
            "outcome": message_outcome, "counted": message.counted,
        })
    return rows


def storable_text(value: Any, limit: int) -> str:
    """A value as PostgreSQL text can hold it: no NUL, no lone surrogate, at most ``limit``
    characters. One unstorable row would fail the whole group-commit batch it is in."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")[:limit]
