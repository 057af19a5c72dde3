"""A secret carried across a POST-redirect-GET and shown once: a new API key, a generated password.

The session store is a database table (or a cache) that outlives the page, so the value goes in
encrypted with the credential ring (``external_mcp.crypto``), bound to the session's user, and is
popped by the first page that shows it: a reload shows it no more.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from external_mcp import crypto

SESSION_PREFIX = "twinmcp_once:"


def _context(request: HttpRequest, name: str) -> str:
    return f"show-once:{name}:user:{request.user.pk}"


def stash(request: HttpRequest, name: str, data: dict[str, Any]) -> None:
    request.session[SESSION_PREFIX + name] = crypto.encrypt_json(data, context=_context(request, name))


def pop(request: HttpRequest, name: str) -> dict[str, Any] | None:
    """The stashed value, gone from the session from now on; None when absent or unreadable
    (another user's, or made with a key no longer in the ring)."""
    token = request.session.pop(SESSION_PREFIX + name, None)
    if not isinstance(token, str):
        return None
    try:
        return crypto.decrypt_json(token, context=_context(request, name))
    except (crypto.DecryptionError, ValueError):
        return None
