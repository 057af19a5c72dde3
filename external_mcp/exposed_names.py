"""What a server's tools are called where several servers meet (the workspace endpoint and
toolsets): ``<prefix>__<tool>``.

The prefix is the server's slug in its workspace: runs of lowercase letters and digits joined by
single ``-`` or ``_``, so it never contains ``__`` and never starts or ends with a separator; the
first ``__`` of an exposed name always ends the prefix, and two servers never share a name.
Exposed names follow the MCP tool-name rule (1–128 of ``[A-Za-z0-9_.-]``) and fit
``EXTERNAL_MCP_TOOL_NAME_MAX_CHARS`` (64 by default: many clients still cut names there). A
tool whose name breaks the rule or would not fit gets a short form: its name with every other
character as ``_``, cut to fit, then ``_`` and the first hex digits of the SHA-256 of its exact
name. Names depend only on the prefix and the server's tool names, so one catalog always gives
the same names, whichever process computes them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable

from django.utils.text import slugify

from external_mcp import tool_names
from external_mcp.storable import utf8

SEPARATOR = "__"
PREFIX_MAX_CHARS = 24
_PREFIX_RE = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
_OUTSIDE_RULE = re.compile(r"[^A-Za-z0-9_.-]")
_DIGITS = 8


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a server's prefix, or None."""
    if not prefix:
        return "A prefix cannot be empty."
    if len(prefix) > PREFIX_MAX_CHARS:
        return f"A prefix has at most {PREFIX_MAX_CHARS} characters."
    if not _PREFIX_RE.fullmatch(prefix):
        return ("A prefix is lowercase letters and digits, in runs joined by single '-' or '_' "
                "(it cannot start or end with one, nor contain '__').")
    return None


def derive_prefix(name: str, taken: Collection[str]) -> str:
    """A prefix for a server called ``name``, not in ``taken`` (the workspace's other prefixes)."""
    slug = re.sub(r"[-_]+", lambda m: m.group(0)[0], slugify(name).lower())
    base = slug.strip("-_")[:PREFIX_MAX_CHARS].strip("-_") or "server"
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        suffix = f"-{number}"
        candidate = base[:PREFIX_MAX_CHARS - len(suffix)].strip("-_") + suffix
    return candidate


def exposed_names(prefix: str, names: Iterable[str], *, max_chars: int) -> dict[str, str]:
    """Each tool name of one server, mapped to its exposed name. Left out: names TwinMCP refuses
    (``tool_names.refusal``), and a short form that still collides once it has no room for more
    digits (only a server that crafts its own names against this rule gets there)."""
    accepted = sorted({name for name in names if tool_names.refusal(name) is None})
    head = prefix + SEPARATOR
    exposed = {name: head + name for name in accepted
               if tool_names.conforms(name) and len(head) + len(name) <= max_chars}
    used = set(exposed.values())
    for name in accepted:
        if name in exposed:
            continue
        digest = hashlib.sha256(utf8(name)).hexdigest()
        digits = _DIGITS
        candidate = _short(head, name, digest[:digits], max_chars)
        while candidate in used and len(head) + digits < max_chars - 4:
            digits += 4
            candidate = _short(head, name, digest[:digits], max_chars)
        if candidate not in used:
            exposed[name] = candidate
            used.add(candidate)
    return exposed


def _short(head: str, name: str, digest: str, max_chars: int) -> str:
    room = max_chars - len(head) - len(digest) - 1
    readable = _OUTSIDE_RULE.sub("_", name)[:max(room, 0)].rstrip("_.-")
    return f"{head}{readable}_{digest}" if readable else f"{head}{digest}"
