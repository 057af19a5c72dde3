"""What an admin reviews before approving a tool: its schemas and annotations, as the upstream sent
them. Everything here is upstream text: it is shown, never trusted (the template escapes it, and
hidden characters are made visible since a schema can hide instructions in them)."""

from __future__ import annotations

import json
from typing import Any

from django import template

from external_mcp import storable

register = template.Library()

MAX_SCHEMA_CHARS = 20_000
MAX_VALUE_CHARS = 200
# The MCP tool annotations, in the words of the badge; all are hints the upstream asserts.
ANNOTATIONS = (
    ("title", "Title"),
    ("readOnlyHint", "Read-only"),
    ("destructiveHint", "Destructive"),
    ("idempotentHint", "Idempotent"),
    ("openWorldHint", "Open world"),
)


def _pretty(value: Any) -> str:
    if value in (None, {}, []):
        return ""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    if len(text) > MAX_SCHEMA_CHARS:
        text = text[:MAX_SCHEMA_CHARS] + f"\n… ({len(text) - MAX_SCHEMA_CHARS} more characters)"
    return storable.display_text(text)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return storable.display_text(text, MAX_VALUE_CHARS)


@register.simple_tag
def tool_review(definition: Any) -> dict[str, Any]:
    """The input schema and output schema as indented JSON, the annotations as labelled values."""
    definition = definition if isinstance(definition, dict) else {}
    raw = definition.get("annotations")
    raw = raw if isinstance(raw, dict) else {}
    annotations = [{"key": key, "label": label, "value": _shown(raw[key]),
                    "warn": key == "destructiveHint" and raw[key] is True}
                   for key, label in ANNOTATIONS if key in raw]
    return {"input": _pretty(definition.get("inputSchema")), "output": _pretty(definition.get("outputSchema")),
            "annotations": annotations}
