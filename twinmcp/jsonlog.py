"""Structured logs: one JSON object per line, with the request's correlation fields, and a
redaction pass so no credential can reach a log even if a message carries one by mistake."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

FIELDS = ("event", "request_id", "workspace", "user", "server", "tool", "method", "outcome", "status",
          "latency_ms", "path", "endpoint", "stages", "detail")
FREE_TEXT = {"detail"}
"""Fields that carry an exception's or an upstream's words, redacted like the message; the others are
ids, names and numbers TwinMCP checked, and redacting them would cost every request's line."""
SECRET_PATTERNS = [
    re.compile(r"tmcp_[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"v1\.[0-9a-f]{8}\.[A-Za-z0-9_-]{20,}"),
]


def redact(text: str) -> str:
    for pattern in SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = redact(value) if name in FREE_TEXT and isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class RedactingFormatter(logging.Formatter):
    """The plain development format, redacted the same way."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
