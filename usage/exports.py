"""Usage exports: rows shaped for people and pipelines, CSV / JSON / JSON Lines writers that
stream with constant memory, and pseudonymisation.

Pseudonyms: ``"u_" + 16 hex`` of HMAC-SHA256(user id) under a key derived per workspace with HKDF
from ``SECRET_KEY`` (salt ``twinmcp/usage-pseudonym/v1``, info = the workspace id). The same user
gets the same pseudonym in every export of one workspace (joins keep working) and unrelated ones
in two workspaces (no linking across tenants); without SECRET_KEY nobody can reverse or recompute
them. Rotating SECRET_KEY changes every pseudonym.

CSV cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return) are prefixed with a single quote (OWASP "CSV injection").
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Case, F, QuerySet, When
from django.http import HttpRequest, StreamingHttpResponse

from usage.models import Outcome, UsageEvent
from usage.queries import (
    OUTCOME_COUNTS,
    SUMMED,
    UsageQuery,
    as_date,
    as_datetime,
    as_float,
    as_int,
    as_uuid,
    iso,
    midnight,
    outcome_split,
)

CHUNK_ROWS = 2000  # rows fetched per round trip (server-side cursor)
FLUSH_ROWS = 500  # rows per streamed chunk

CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "jsonl": "application/x-ndjson",
}
EXTENSIONS = {"csv": "csv", "json": "json", "jsonl": "jsonl"}

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

# The outcome columns came later: appended after every historical column, so that loaders reading
# columns by position keep working.
LEGACY_SUMMED = tuple(c for c in SUMMED if c not in OUTCOME_COUNTS)
METRIC_COLUMNS = (*LEGACY_SUMMED, "latency_avg_ms", "latency_p95_ms", "first_at", "last_at")
OUTCOME_COLUMNS = (*OUTCOME_COUNTS, *(f"outcome_{o}" for o in Outcome.values))
EVENT_COLUMNS = (
    "created_at", "workspace", "user_id", "username", "email", "server_id", "server_name", "api_key_id", "method",
    "tool", "request_id", "jsonrpc_id", "outcome", "counted", "tokens_in", "tokens_out", "bytes_in", "bytes_out",
    "latency_ms", "upstream_status", "jsonrpc_error_code", "endpoint", "toolset_id",
)


# -- pseudonyms ----------------------------------------------------------------------------------------


class Pseudonymizer:
    """Stable keyed pseudonyms of user ids, one key per workspace."""

    SALT = b"twinmcp/usage-pseudonym/v1"

    def __init__(self, secret: str | None = None) -> None:
        self.secret = (secret if secret is not None else settings.SECRET_KEY).encode()
        self._keys: dict[uuid.UUID | None, bytes] = {}
        # An export repeats the same few users on every row: one HMAC per user, not per row.
        self._users: dict[tuple[Any, Any], str] = {}

    def key(self, workspace_id: Any) -> bytes:
        workspace = as_uuid(workspace_id)
        key = self._keys.get(workspace)
        if key is None:
            info = b"workspace:" + str(workspace).encode()
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.SALT, info=info).derive(self.secret)
            self._keys[workspace] = key
        return key

    def user(self, workspace_id: Any, user_id: Any) -> str | None:
        if user_id is None:
            return None
        pseudonym = self._users.get((workspace_id, user_id))
        if pseudonym is None:
            digest = hmac.new(self.key(workspace_id), str(int(user_id)).encode(), hashlib.sha256).hexdigest()
            pseudonym = self._users[(workspace_id, user_id)] = "u_" + digest[:16]
        return pseudonym


# -- rows ----------------------------------------------------------------------------------------------


def grouped_columns(group_by: Sequence[str]) -> list[str]:
    columns = ["workspace"]
    for dim in group_by:
        columns += {"day": ["day"], "user": ["user_id", "username", "email"], "server": ["server_id", "server_name"],
                    "tool": ["tool"]}[dim]
    columns += METRIC_COLUMNS
    if "tool" not in group_by:
        columns.append("unique_tools")
    if "user" in group_by:
        columns.append("error_rate")
    columns += OUTCOME_COLUMNS
    return columns


def grouped_row(raw: dict[str, Any], group_by: Sequence[str], pseudonyms: Pseudonymizer | None) -> dict[str, Any]:
    """One grouped SQL row (see ``UsageQuery.grouped_sql``) as a flat, JSON-ready dict."""
    workspace_id = as_uuid(raw["workspace_id"])
    row: dict[str, Any] = {"workspace": raw.get("workspace_slug") or (str(workspace_id) if workspace_id else None)}
    for dim in group_by:
        if dim == "day":
            day = as_date(raw["day"])
            row["day"] = day.isoformat() if day else None
        elif dim == "user":
            if pseudonyms is not None:
                row.update(user_id=pseudonyms.user(workspace_id, raw["user_id"]), username=None, email=None)
            else:
                row.update(user_id=raw["user_id"], username=raw.get("username"), email=raw.get("email") or None)
        elif dim == "server":
            server_id = as_uuid(raw["server_id"])
            row.update(server_id=str(server_id) if server_id else None, server_name=raw.get("server_name"))
        else:
            row["tool"] = raw["tool"]
    requests = as_int(raw["requests"])
    for column in LEGACY_SUMMED:
        row[column] = as_int(raw[column])
    row["latency_avg_ms"] = round(float(raw["latency_sum_ms"] or 0) / requests, 3) if requests else None
    row["latency_p95_ms"] = as_float(raw["latency_p95_ms"])
    row["first_at"] = iso(as_datetime(raw["first_at"]))
    row["last_at"] = iso(as_datetime(raw["last_at"]))
    if "tool" not in group_by:
        row["unique_tools"] = as_int(raw["unique_tools"])
    if "user" in group_by:
        row["error_rate"] = round(row["errors"] / requests, 4) if requests else None
    for column in OUTCOME_COUNTS:
        row[column] = as_int(raw[column])
    row["outcomes"] = outcome_split(row)
    return row


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A grouped row for files: the outcome split as ``outcome_<name>`` columns, one value per cell."""
    flat = {k: v for k, v in row.items() if k != "outcomes"}
    flat.update({f"outcome_{name}": count for name, count in row["outcomes"].items()})
    return flat


def grouped_rows(query: UsageQuery, *, pseudonymize: bool) -> Iterator[dict[str, Any]]:
    pseudonyms = Pseudonymizer() if pseudonymize else None
    for raw in query.stream(chunk_size=CHUNK_ROWS, pseudonymize=pseudonymize):
        yield flat_row(grouped_row(raw, query.group_by, pseudonyms))


_EVENT_FIELDS = (
    "created_at", "workspace_id", "workspace__slug", "user_id", "user__username", "user__email", "server_id",
    "own_server_name", "api_key_id", "method", "tool_name", "request_id", "jsonrpc_id", "outcome", "counted",
    "tokens_in", "tokens_out", "bytes_in", "bytes_out", "latency_ms", "upstream_status", "jsonrpc_error_code",
    "endpoint", "toolset_id",
)


def event_queryset(query: UsageQuery) -> QuerySet:
    """Raw events in range (only those retention has kept), oldest first, with names joined."""
    last = min(query.end, query.today + timedelta(days=1))
    events = UsageEvent.objects.filter(query.filters(raw=True))
    if last < query.start:
        events = events.none()
    else:
        events = events.filter(created_at__gte=midnight(query.start), created_at__lt=midnight(last + timedelta(days=1)))
    # A server lends its name only to events of its own workspace (see UsageQuery.grouped_sql).
    own_server_name = Case(When(server__workspace_id=F("workspace_id"), then=F("server__name")), default=None)
    return events.annotate(own_server_name=own_server_name).order_by("created_at", "id").values_list(*_EVENT_FIELDS)


def event_rows(query: UsageQuery, *, pseudonymize: bool) -> Iterator[dict[str, Any]]:
    pseudonyms = Pseudonymizer() if pseudonymize else None
    for values in event_queryset(query).iterator(chunk_size=CHUNK_ROWS):
        raw = dict(zip(_EVENT_FIELDS, values, strict=True))
        workspace_id = raw["workspace_id"]
        if pseudonyms is not None:
            user_id, username, email, api_key = pseudonyms.user(workspace_id, raw["user_id"]), None, None, None
        else:
            user_id, username, email = raw["user_id"], raw["user__username"], raw["user__email"] or None
            api_key = str(raw["api_key_id"]) if raw["api_key_id"] else None
        yield {
            "created_at": iso(raw["created_at"]),
            "workspace": raw["workspace__slug"] or (str(workspace_id) if workspace_id else None),
            "user_id": user_id, "username": username, "email": email,
            "server_id": str(raw["server_id"]) if raw["server_id"] else None, "server_name": raw["own_server_name"],
            "api_key_id": api_key, "method": raw["method"],
            "tool": raw["tool_name"] if raw["method"] == "tools/call" else "",
            "request_id": raw["request_id"], "jsonrpc_id": raw["jsonrpc_id"], "outcome": raw["outcome"],
            "counted": raw["counted"], "tokens_in": raw["tokens_in"], "tokens_out": raw["tokens_out"],
            "bytes_in": raw["bytes_in"], "bytes_out": raw["bytes_out"], "latency_ms": raw["latency_ms"],
            "upstream_status": raw["upstream_status"], "jsonrpc_error_code": raw["jsonrpc_error_code"],
            "endpoint": raw["endpoint"], "toolset_id": str(raw["toolset_id"]) if raw["toolset_id"] else None,
        }


# -- writers (generators of bytes chunks) -------------------------------------------------------------


def csv_cell(value: Any) -> Any:
    """A value for one CSV cell, neutralised if a spreadsheet would evaluate it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_chunks(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    pending = 0
    for row in rows:
        writer.writerow([csv_cell(row.get(column)) for column in columns])
        pending += 1
        if pending >= FLUSH_ROWS:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue().encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, date | uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps_row(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def jsonl_chunks(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    lines: list[str] = []
    for row in rows:
        lines.append(dumps_row(row) + "\n")
        if len(lines) >= FLUSH_ROWS:
            yield "".join(lines).encode()
            lines = []
    yield "".join(lines).encode()


def json_array_chunks(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """A JSON array written one element at a time: ``[`` … ``]``, one row per line."""
    parts: list[str] = ["["]
    first = True
    for row in rows:
        parts.append(("\n" if first else ",\n") + dumps_row(row))
        first = False
        if len(parts) >= FLUSH_ROWS:
            yield "".join(parts).encode()
            parts = []
    parts.append("\n]\n")
    yield "".join(parts).encode()


def chunks(fmt: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    if fmt == "csv":
        return csv_chunks(columns, rows)
    if fmt == "jsonl":
        return jsonl_chunks(rows)
    return json_array_chunks(rows)


# -- HTTP -------------------------------------------------------------------------------------------------


def _next_chunk(iterator: Iterator[bytes]) -> bytes | None:
    return next(iterator, None)


async def _async_chunks(iterator: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Drive a synchronous generator from the event loop one chunk at a time, always on the same
    thread as the view (thread_sensitive): its database connection and server-side cursor live
    there. Django would otherwise buffer a synchronous iterator whole under ASGI."""
    step = sync_to_async(_next_chunk, thread_sensitive=True)
    try:
        while (chunk := await step(iterator)) is not None:
            yield chunk
    finally:
        close: Callable[[], None] | None = getattr(iterator, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()


def streaming_response(request: HttpRequest, content: Iterator[bytes], *, fmt: str,
                       filename: str) -> StreamingHttpResponse:
    body: Any = _async_chunks(content) if isinstance(request, ASGIRequest) else content
    response = StreamingHttpResponse(body, content_type=CONTENT_TYPES[fmt])
    response["Content-Disposition"] = f'attachment; filename="{filename}.{EXTENSIONS[fmt]}"'
    response["Cache-Control"] = "no-store"
    return response
