"""What TwinMCP can store of the JSON an upstream sends, and a safe form of what it cannot.

Upstreams are hostile input (design.md §9). PostgreSQL ``text`` and ``jsonb`` cannot hold NUL;
UTF-8 cannot encode a lone surrogate, which ``json.loads`` accepts from ``"\\ud800"``; ``jsonb``
has no NaN or Infinity; a deeply nested document exhausts Python's recursion (``json.dumps``)
and PostgreSQL's stack. Every walk here uses an explicit stack, so no document raises
``RecursionError``. Invisible characters (controls, bidirectional overrides, zero-width and tag
characters) are storable, but an admin reviewing a definition must see them: ``display_text``
makes them visible.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64

_C0_PICTURES = {code: chr(0x2400 + code) for code in range(0x20)} | {0x7F: "\u2421"}
# Characters a reader cannot see or that change how the text around them is shown: C0 controls
# except tab, newline and carriage return, DEL and C1 controls, Unicode format characters
# (category Cf: soft hyphen, zero-width, bidirectional controls, tags…), line and paragraph
# separators, and lone surrogates.
_HIDDEN = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return _C0_PICTURES.get(code) or f"\u27e8U+{code:04X}\u27e9"


def display_text(text: str, limit: int | None = None) -> str:
    """``text`` with every hidden character made visible (␀, ␛, ⟨U+200B⟩…), at most ``limit``
    characters: storable in PostgreSQL and safe to show an admin who must review it."""
    shown = _HIDDEN.sub(_visible, text)
    if limit is not None and len(shown) > limit:
        shown = shown[: max(limit - 1, 0)] + "…"
    return shown


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    match = re.search("[\ud800-\udfff]", text)
    if match:
        return f"contains an invalid Unicode character (a lone surrogate, U+{ord(match.group(0)):04X})"
    return None


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages (``object``, ``array``, ``string``…)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", dict: "object", list: "array"}.get(type(value), "null" if value is None else "value")


def _child(path: str, key: str) -> str:
    shown = display_text(key, 60)
    return f"{path}.{shown}" if path else shown


def problem(value: Any, *, path: str = "") -> str | None:
    """Why ``value`` cannot be stored as it is, naming where (``inputSchema.properties.x``), or None."""
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list) and depth > MAX_DEPTH:
            top = re.split(r"[.\[]", where, maxsplit=1)[0] if where else ""
            return f"{top or 'the document'} is nested more than {MAX_DEPTH} levels deep"
        if isinstance(item, str):
            reason = _text_problem(item)
            if reason:
                return f"{where or 'the value'} {reason}"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{where or 'the value'} is {json.dumps(item)}, a number PostgreSQL JSON cannot store"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                reason = _text_problem(key) if isinstance(key, str) else None
                if reason:
                    return f"{where or 'the document'} has a key that {reason}"
                stack.append((child, _child(where, str(key)), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in reversed(list(enumerate(item))))
    return None


def _safe_scalar(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub(_visible, value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    return value


def safe(value: Any) -> Any:
    """A storable copy of ``value``: NUL and lone surrogates shown as ␀ and ⟨U+D800⟩, NaN and
    Infinity as strings, anything nested past ``MAX_DEPTH`` replaced by ``"…"``."""
    if not isinstance(value, dict | list):
        return _safe_scalar(value)
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in items:
            if isinstance(child, dict | list):
                copy: Any = ("…" if depth >= MAX_DEPTH else {} if isinstance(child, dict) else [])
                if depth < MAX_DEPTH:
                    stack.append((child, copy, depth + 1))
            else:
                copy = _safe_scalar(child)
            if isinstance(target, dict):
                target[_safe_scalar(str(key))] = copy
            else:
                target.append(copy)
    return root


def canonical_json(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` without
    recursion: the same text for any document, however deep."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Literal):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            stack.append(_Literal("}"))
            keys = sorted(item)
            for index in range(len(keys) - 1, -1, -1):
                stack.append(item[keys[index]])
                stack.append(_Literal(("," if index else "") + json.dumps(keys[index], ensure_ascii=False) + ":"))
        elif isinstance(item, list | tuple):
            out.append("[")
            stack.append(_Literal("]"))
            for index in range(len(item) - 1, -1, -1):
                stack.append(item[index])
                if index:
                    stack.append(_Literal(","))
        else:
            out.append(json.dumps(item, ensure_ascii=False))
    return "".join(out)


class _Literal:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def utf8(text: str) -> bytes:
    """UTF-8 that also encodes lone surrogates, so any received text has bytes to hash and measure."""
    return text.encode("utf-8", "surrogatepass")
