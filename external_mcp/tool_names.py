"""Which tool names TwinMCP accepts, and what it calls a tool whose name it refuses.

The MCP specification says tool names SHOULD be 1–128 characters of ``[A-Za-z0-9_.-]``. The
official SDK only warns about other names and registers them anyway, and real servers use ``/``,
spaces, commas or non-ASCII letters, so TwinMCP accepts any name an admin can read and an agent
can send back exactly: 1–128 visible characters (ordinary spaces allowed inside). Such names are
flagged as not conforming (some clients refuse or rename them) but can be approved.

Refused, with the reason shown to admins and to agents that call them: empty names, names over
128 characters (never shortened: a shortened name could be another tool's), names with leading
or trailing whitespace, and names containing control, invisible-formatting, line-separator,
surrogate, private-use or unassigned characters, or spaces other than U+0020 — characters that
PostgreSQL cannot store, that a reviewing admin cannot see, or that make two different names look
alike. A refused tool is kept in the catalog under ``storage_key(name)``, which can never equal
an accepted name, so it cannot take another tool's place.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from external_mcp.storable import display_text, utf8

MAX_CHARS = 128
STORED_CHARS = 200  # the catalog column: accepted names fit whole, refused ones get a storage key
SPEC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")

_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Cs": "an invalid (surrogate) character",
    "Co": "a private-use character",
    "Cn": "an unassigned character",
    "Zl": "a line-separator character",
    "Zp": "a paragraph-separator character",
    "Zs": "a space character other than the ordinary space",
}


def conforms(name: str) -> bool:
    """Whether the name follows the specification's rules (1–128 of ``[A-Za-z0-9_.-]``)."""
    return bool(SPEC_NAME.fullmatch(name))


def refusal(name: str) -> str | None:
    """Why TwinMCP refuses this tool name, or None when it accepts it."""
    if not name:
        return "The tool name is empty."
    if len(name) > MAX_CHARS:
        return (f"The tool name is {len(name)} characters long; MCP tool names have at most {MAX_CHARS}. "
                "TwinMCP does not shorten names (a shortened name could be another tool's).")
    for char in name:
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES and not (category == "Zs" and char == " "):
            return (f"The tool name contains {_REFUSED_CATEGORIES[category]} (U+{ord(char):04X}), which an "
                    "admin could not see or TwinMCP could not store.")
    if name != name.strip():
        return "The tool name starts or ends with a space."
    return None


def storage_key(name: str) -> str:
    """The catalog's name for a tool whose name is refused: a space (no accepted name starts with
    one), a digest of the exact name (two refused names never share a key) and a readable form."""
    digest = hashlib.sha256(utf8(name)).hexdigest()[:16]
    return f" #{digest} {display_text(name)}"[:STORED_CHARS]


def catalog_key(name: str) -> str:
    """The name the catalog stores: the name itself when accepted, else its storage key."""
    return name if refusal(name) is None else storage_key(name)
