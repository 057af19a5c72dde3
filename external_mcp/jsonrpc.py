"""JSON-RPC pieces the proxy needs: parse what the agent sent, build errors, and summarise
the upstream's answer (error codes and sizes per request id) for usage events."""

from __future__ import annotations

import json
from typing import Any


def messages_of(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a POST body (a batch is a list). Raises ValueError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not valid JSON") from None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(m, dict) for m in items):
        raise ValueError("expected a JSON-RPC message object")
    return items


def error_body(request_id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")).encode()


def _sse_messages(payload: bytes) -> list[bytes]:
    messages: list[bytes] = []
    lines: list[bytes] = []
    for line in payload.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            if lines:
                messages.append(b"\n".join(lines))
                lines = []
        elif line.startswith(b"data:"):
            lines.append(line[5:].lstrip(b" "))
    if lines:
        messages.append(b"\n".join(lines))
    return messages


def response_summary(payload: bytes, kind: str) -> dict[str, dict[str, Any]]:
    """Map ``json.dumps(id)`` → {"error_code", "bytes", "raw"} for each response found."""
    raws = _sse_messages(payload) if kind == "text/event-stream" else [payload]
    summary: dict[str, dict[str, Any]] = {}
    for raw in raws:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        for message in data if isinstance(data, list) else [data]:
            if not isinstance(message, dict) or "id" not in message or "method" in message:
                continue
            error = message.get("error")
            code = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), int) else None
            summary[json.dumps(message["id"])] = {"error_code": code, "bytes": len(raw), "raw": raw}
    return summary
