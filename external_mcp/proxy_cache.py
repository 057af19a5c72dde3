"""What the proxy needs per request, cached in-process for a few seconds so the hot path
makes no database query: the caller's key and plan, the server, its credentials and the
set of approved tools. Changes made through the services flush these caches in every
gateway process at once (``twinmcp.invalidation``); ``EXTERNAL_MCP_PROXY_CACHE_SECONDS``
bounds the rest (Django admin edits, Redis unreachable)."""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from yarl import URL

from external_mcp import tool_names
from external_mcp.auth_schemes import AuthScheme
from external_mcp.catalog import canonical_definition, definition_hash
from external_mcp.choices import ServerStatus, ToolState
from external_mcp.models import ExternalMcpServer, ExternalMcpTool
from external_mcp.oauth.grants import ConnectionNeeded
from external_mcp.outbound import scheme_for
from external_mcp.services import CredentialUnavailable
from external_mcp.storable import display_text
from twinmcp import invalidation
from twinmcp.apikeys import ApiKeyError, hash_key, resolve_key
from twinmcp.flags import external_mcp_enabled
from twinmcp.services import profile_ensure


@dataclass(frozen=True)
class KeyInfo:
    key_id: Any
    user_id: int
    username: str
    workspace_id: Any
    expires_at: datetime | None
    plan: str
    daily_limit: int | None


@dataclass(frozen=True)
class ServerInfo:
    id: Any
    workspace_id: Any
    name: str
    base_url: str
    enabled: bool
    status: str
    flag_on: bool
    auth_headers: dict[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | bool = False
    credential_error: str = ""
    tool_states: dict[str, str] = field(default_factory=dict)
    approved_hashes: dict[str, str] = field(default_factory=dict)
    token_scheme: AuthScheme | None = None
    """Set when each request's credentials carry a token obtained over the network (OAuth)."""
    connection_needed: str = ""
    """Why the caller's calls cannot go through until an account is connected, naming where."""
    legacy_sse: bool = False
    """The server speaks the HTTP+SSE transport (chosen, or found by ``auto``)."""

    @property
    def disabled(self) -> bool:
        return not self.enabled or self.status == ServerStatus.DISABLED

    @functools.cached_property
    def url(self) -> URL:
        """``base_url`` parsed once per cached entry, where aiohttp would parse the string on every call."""
        return URL(self.base_url)


class TTLCache:
    def __init__(self, max_items: int = 10000) -> None:
        self.items: dict[Any, tuple[float, Any]] = {}
        self.max_items = max_items

    def get(self, key: Any) -> Any:
        hit = self.items.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def set(self, key: Any, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self.items) >= self.max_items:
            self.items.clear()
        self.items[key] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        self.items.clear()


keys = TTLCache()
servers = TTLCache()
flags = TTLCache()
invalidation.on_flush(keys.clear)
invalidation.on_flush(servers.clear)
invalidation.on_flush(flags.clear)
_inflight: dict[tuple[int, Any], asyncio.Future[Any]] = {}


async def single_flight(cache: TTLCache, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
    """One load per key at a time: when an entry expires under load, the concurrent requests
    wait for the same database round trip instead of each making their own."""
    value = cache.get(key)
    if value is not None:
        return value
    slot = (id(asyncio.get_running_loop()), key)
    pending = _inflight.get(slot)
    if pending is not None:
        return await asyncio.shield(pending)
    generation = invalidation.generation()
    pending = _inflight[slot] = asyncio.ensure_future(load())
    try:
        value = await pending
    finally:
        _inflight.pop(slot, None)
    if value is not None and invalidation.generation() == generation:
        cache.set(key, value, _ttl())
    return value


def _ttl() -> float:
    return float(settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS)


def _load_key(raw: str) -> KeyInfo:
    close_old_connections()
    key = resolve_key(raw)
    plan = profile_ensure(user=key.user).plan
    return KeyInfo(key_id=key.pk, user_id=key.user_id, username=key.user.get_username(),
                   workspace_id=key.workspace_id, expires_at=key.expires_at, plan=plan.code,
                   daily_limit=plan.effective_daily_limit)


async def get_key(raw: str) -> KeyInfo:
    digest = hash_key(raw)
    info: KeyInfo = await single_flight(keys, digest, lambda: sync_to_async(_load_key, thread_sensitive=False)(raw))
    if info.expires_at is not None and info.expires_at.timestamp() <= time.time():
        keys.items.pop(digest, None)
        raise ApiKeyError("This API key has expired.")
    return info


class _FlagRequest:
    """The minimum waffle needs to evaluate a flag for a user outside an HTTP request."""

    def __init__(self, user: Any) -> None:
        self.user = user
        self.GET: dict[str, str] = {}
        self.COOKIES: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self.META: dict[str, str] = {}


def _flag_on(user_id: int, workspace_id: Any) -> bool:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(pk=user_id)
    return external_mcp_enabled(_FlagRequest(user), workspace_ids=[workspace_id])


def _load_flag(user_id: int, workspace_id: Any) -> bool:
    close_old_connections()
    return _flag_on(user_id, workspace_id)


async def flag_on(key: KeyInfo) -> bool:
    """Whether external MCP servers are switched on for the key's user in its workspace."""
    return await single_flight(flags, (key.user_id, key.workspace_id),
                               lambda: sync_to_async(_load_flag, thread_sensitive=False)(key.user_id, key.workspace_id))


def _load_server(server_id: Any, user_id: int, workspace_id: Any) -> ServerInfo | None:
    close_old_connections()
    server = (ExternalMcpServer.objects.select_related("credential")
              .filter(pk=server_id, workspace_id=workspace_id).first())
    if server is None:
        return None  # unknown, or another workspace's: nothing of it is loaded, nothing decrypted
    flag_on = _flag_on(user_id, server.workspace_id)
    headers: dict[str, str] = {}
    token_scheme: AuthScheme | None = None
    context: ssl.SSLContext | bool = False
    error = needed = ""
    try:
        scheme = scheme_for(server, user_id)
        headers = scheme.headers()
        token_scheme = scheme if scheme.fetches_token else None
        if server.base_url.startswith("https:"):
            context = scheme.ssl_context()
    except ConnectionNeeded as exc:
        needed = str(exc)
    except (CredentialUnavailable, ValueError, ssl.SSLError) as exc:
        error = str(exc)
    tools = ExternalMcpTool.objects.filter(server=server).values_list("name", "state", "approved_hash")
    return ServerInfo(id=server.pk, workspace_id=server.workspace_id, name=server.name, base_url=server.base_url,
                      enabled=server.enabled, status=server.status, flag_on=flag_on, auth_headers=headers,
                      ssl=context, credential_error=error, connection_needed=needed,
                      tool_states={name: state for name, state, _ in tools},
                      approved_hashes={name: digest for name, _, digest in tools if digest}, token_scheme=token_scheme,
                      legacy_sse=server.speaks_sse)


async def get_server(server_id: Any, key: KeyInfo) -> ServerInfo | None:
    """The server as the key's user sees it, or None when it is not in the key's workspace."""
    return await server_for(server_id, key.user_id, key.workspace_id)


async def server_for(server_id: Any, user_id: int, workspace_id: Any) -> ServerInfo | None:
    return await single_flight(
        servers, (server_id, user_id, workspace_id),
        lambda: sync_to_async(_load_server, thread_sensitive=False)(server_id, user_id, workspace_id),
    )


def pinned(info: ServerInfo, tool: dict[str, Any]) -> bool:
    """Whether a tools/list entry is, as the upstream sends it now, the definition an admin
    approved: an upstream that shows the health check one definition and agents another is caught
    on the agent's own list, not only if a later check happens to see the change."""
    name = tool.get("name")
    return isinstance(name, str) and definition_hash(canonical_definition(tool)) == info.approved_hashes.get(name)


def tool_refusal(info: ServerInfo, name: str) -> str | None:
    """Why a tool may not be called, or None when it is approved."""
    state = info.tool_states.get(name)
    if state == ToolState.APPROVED:
        return None
    shown = display_text(name, 80)
    problem = tool_names.refusal(name)
    if problem:
        return f"Tool {shown!r} cannot be called through TwinMCP, which refuses its name: {problem}"
    reasons = {
        None: f"Tool {shown!r} is not in {info.name}'s approved catalog.",
        ToolState.PENDING: f"Tool {shown!r} is pending approval by a workspace admin.",
        ToolState.CHANGED: f"Tool {shown!r} changed its definition since it was approved; it is quarantined until "
                           "an admin approves it again.",
        ToolState.REFUSED: f"Tool {shown!r} was refused by TwinMCP: {info.name} sends a definition TwinMCP cannot "
                           "store or accept as received (the reason is on the server's page). It cannot be called "
                           "until the server fixes it.",
        ToolState.DISABLED: f"Tool {shown!r} was disabled by a workspace admin.",
        ToolState.REMOVED: f"Tool {shown!r} is no longer offered by {info.name}.",
    }
    return reasons.get(state, reasons[None])


__all__ = ["ApiKeyError", "KeyInfo", "ServerInfo", "flag_on", "get_key", "get_server", "pinned", "server_for",
           "tool_refusal"]
