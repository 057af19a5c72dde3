"""The catalog an aggregate endpoint serves: every approved tool of the workspace's enabled servers
(``/api/v1/external-mcp/mcp``), or of one toolset's members (``/toolsets/<id>/mcp``).

``tools/list`` there never reaches an upstream: it is answered from the definitions admins
approved, each exactly as pinned, under its exposed name (``exposed_names``). The view is built
once per workspace or toolset and kept in process memory like keys and servers
(``proxy_cache``); ``twinmcp.invalidation`` drops it in every gateway process when an approval,
a quarantine, a server or a toolset changes. Pages of ``tools/list`` are serialised once per view,
so listing a thousand tools costs a dictionary lookup and a byte join.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from external_mcp.choices import PrefixMode, ServerStatus, ToolState
from external_mcp.exposed_names import SEPARATOR, exposed_names
from external_mcp.jsonrpc import dumps
from external_mcp.models import ExternalMcpServer, ExternalMcpTool, Toolset
from external_mcp.proxy_cache import TTLCache, single_flight
from twinmcp import invalidation

logger = logging.getLogger("external_mcp.proxy")

PREFIXED_URI = "twinmcp://"
"""Resource URIs of several servers meet as ``twinmcp://<prefix>/<the server's own URI>``."""


class InvalidCursor(ValueError):
    pass


@dataclass(frozen=True)
class Member:
    """A server whose tools an aggregate endpoint serves."""

    id: Any
    prefix: str
    name: str
    era: str
    """How the last check spoke to it: "stateless" (2026-07-28) or "handshake"."""
    capabilities: dict[str, Any]
    serving: bool
    """Enabled and not disabled by status: only then are its tools listed."""
    whole: bool = True
    """A member as a whole, not for some of its tools only: only then are its resources and
    prompts served too."""


@dataclass(frozen=True)
class Route:
    server_id: Any
    name: str
    """The tool's name at its server."""


@dataclass
class View:
    workspace_id: Any
    toolset_id: Any
    prefixed: bool
    members: dict[Any, Member]
    routes: dict[str, Route]
    """Every exposed name of a member's listed tool, callable or not: a call of one that is not
    approved is refused with the same reason as on the server's own endpoint."""
    tools: list[dict[str, Any]]
    collisions: list[str]
    digest: str
    title: str
    origins: dict[tuple[str, str], Any] = field(default_factory=dict)
    """Which member listed a resource or prompt, by capability and name, where names are not prefixed."""
    _pages: dict[tuple[int, int], bytes] = field(default_factory=dict)

    @property
    def by_prefix(self) -> dict[str, Member]:
        return {m.prefix: m for m in self.members.values()}

    def serving(self, capability: str) -> list[Member]:
        """The members whose resources or prompts (or completions) this endpoint serves."""
        return [m for m in self.members.values() if m.serving and m.whole and capability in m.capabilities]

    def capabilities(self) -> dict[str, Any]:
        """The union of what the members offer; TwinMCP itself announces tool-list changes, and
        relays no resource or prompt list changes."""
        offered: dict[str, Any] = {"tools": {"listChanged": True}}
        members = [m for m in self.members.values() if m.serving and m.whole]
        if any("resources" in m.capabilities for m in members):
            subscribe = any(isinstance(m.capabilities["resources"], dict)
                            and m.capabilities["resources"].get("subscribe") is True
                            for m in members if "resources" in m.capabilities)
            offered["resources"] = {"subscribe": subscribe, "listChanged": False}
        if any("prompts" in m.capabilities for m in members):
            offered["prompts"] = {"listChanged": False}
        for name in ("completions", "logging"):
            if any(name in m.capabilities for m in members):
                offered[name] = {}
        return offered

    def page(self, cursor: Any) -> tuple[bytes, str | None]:
        """The JSON text of one page of tools, and the next page's cursor."""
        size = settings.EXTERNAL_MCP_TOOLS_PAGE_SIZE
        offset = decode_cursor(cursor)
        if offset > len(self.tools):
            raise InvalidCursor("The cursor is past the end of the list.")
        slot = (offset, size)
        text = self._pages.get(slot)
        if text is None:
            text = self._pages[slot] = dumps(self.tools[offset:offset + size])
        following = offset + size
        return text, encode_cursor(following) if following < len(self.tools) else None


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"tools:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> int:
    if cursor is None:
        return 0
    if not isinstance(cursor, str) or len(cursor) > 40:
        raise InvalidCursor("The cursor is not one this endpoint gave.")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("The cursor is not one this endpoint gave.") from None
    kind, _, number = text.partition(":")
    if kind != "tools" or not number.isdigit():
        raise InvalidCursor("The cursor is not one this endpoint gave.")
    return int(number)


def route_prefixed(name: str) -> tuple[str, str] | None:
    """``(prefix, name)`` of a prefixed prompt name or resource URI, else None."""
    if name.startswith(PREFIXED_URI):
        prefix, slash, rest = name[len(PREFIXED_URI):].partition("/")
        return (prefix, rest) if slash and prefix else None
    prefix, separator, rest = name.partition(SEPARATOR)
    return (prefix, rest) if separator and prefix and rest else None


def build_view(workspace_id: Any, toolset_id: Any = None) -> View | None:
    """``view_of`` in a gateway worker thread, which first drops a connection the database closed."""
    close_old_connections()
    return view_of(workspace_id, toolset_id)


def view_of(workspace_id: Any, toolset_id: Any = None) -> View | None:
    """The catalog served at an aggregate endpoint; None for a toolset not in the workspace."""
    if toolset_id is None:
        servers = ExternalMcpServer.objects.filter(workspace_id=workspace_id)
        return _assemble(workspace_id, None, PrefixMode.ALWAYS, "TwinMCP", None, _members(servers),
                         _rows(servers.values("id")))
    toolset = (Toolset.objects.filter(pk=toolset_id, workspace_id=workspace_id)
               .prefetch_related("servers", "tools").first())
    if toolset is None:
        return None
    return views_of([toolset])[toolset.pk]


def views_of(toolsets: Sequence[Toolset]) -> dict[Any, View]:
    """The view of each toolset (``servers`` and ``tools`` prefetched) in two more queries, however
    many there are: a list of toolsets shows what each serves without a query per row."""
    chosen = {toolset.pk: _chosen(toolset) for toolset in toolsets}
    ids = {server_id for members in chosen.values() for server_id in members}
    servers = _members(ExternalMcpServer.objects.filter(pk__in=ids))
    rows = _rows(list(ids))
    return {t.pk: _assemble(t.workspace_id, t.pk, t.prefix_mode, f"TwinMCP: {t.name}", chosen[t.pk],
                            [s for s in servers if s.id in chosen[t.pk] and s.workspace_id == t.workspace_id],
                            [r for r in rows if r[0] in chosen[t.pk]])
            for t in toolsets}


def _chosen(toolset: Toolset) -> dict[Any, set[str] | None]:
    """server id -> its member tools' names, or None when the whole server is a member."""
    chosen: dict[Any, set[str] | None] = {server.pk: None for server in toolset.servers.all()}
    for tool in toolset.tools.all():
        names = chosen.get(tool.server_id, set())
        if names is not None:
            names.add(tool.name)
            chosen[tool.server_id] = names
    return chosen


def _members(servers: Any) -> list[ExternalMcpServer]:
    return list(servers.only("id", "workspace_id", "prefix", "name", "enabled", "status", "server_info"))


def _rows(server_ids: Any) -> list[tuple[Any, str, str, Any, str]]:
    return list(ExternalMcpTool.objects.listed().filter(server_id__in=server_ids)
                .values_list("server_id", "name", "state", "approved_definition", "approved_hash")
                .order_by("server_id", "name"))


def _assemble(workspace_id: Any, toolset_id: Any, prefix_mode: str, title: str,
              chosen: dict[Any, set[str] | None] | None, servers: Iterable[ExternalMcpServer],
              rows: Iterable[tuple[Any, str, str, Any, str]]) -> View:
    """The naming, collision and listing rules, over rows already read."""
    prefixed = prefix_mode == PrefixMode.ALWAYS
    members = {
        s.id: Member(id=s.id, prefix=s.prefix, name=s.name, era=str(s.server_info.get("era", "")),
                     capabilities=_capabilities(s.server_info), serving=s.enabled and s.status != ServerStatus.DISABLED,
                     whole=chosen is None or chosen.get(s.id) is None)
        for s in servers
    }
    by_server: dict[Any, list[tuple[str, str, Any]]] = {}
    pinned: dict[tuple[Any, str], str] = {}
    for server_id, name, state, definition, approved_hash in rows:
        if server_id in members:
            by_server.setdefault(server_id, []).append((name, state, definition))
            pinned[(server_id, name)] = approved_hash
    routes: dict[str, Route] = {}
    listed: dict[str, tuple[Any, dict[str, Any]]] = {}
    names: dict[Any, dict[str, str]] = {}
    for server_id, tools in by_server.items():
        wanted = chosen.get(server_id) if chosen is not None else None
        names[server_id] = {name: exposed for name, exposed in exposed_names(
            members[server_id].prefix, [t[0] for t in tools],
            max_chars=settings.EXTERNAL_MCP_TOOL_NAME_MAX_CHARS).items() if wanted is None or name in wanted}
    collisions: list[str] = []
    if not prefixed:
        owners: dict[str, list[Any]] = {}
        for server_id, mapping in names.items():
            for name in mapping:
                owners.setdefault(name, []).append(server_id)
        collisions = sorted(name for name, holders in owners.items() if len(holders) > 1)
        for mapping in names.values():
            for name in mapping:
                if name not in collisions:
                    mapping[name] = name
    for server_id, tools in by_server.items():
        member = members[server_id]
        for name, state, definition in tools:
            exposed = names[server_id].get(name)
            if exposed is None:
                continue
            routes[exposed] = Route(server_id=server_id, name=name)
            if member.serving and state == ToolState.APPROVED and isinstance(definition, dict):
                listed[exposed] = (server_id, {**definition, "name": exposed})
    ordered = sorted(listed)
    tools_out = [listed[name][1] for name in ordered]
    # What the list shows, without serialising it: each exposed name with the hash it was approved under.
    shown = [(name, pinned[(listed[name][0], routes[name].name)]) for name in ordered]
    digest = hashlib.sha256(dumps([shown, sorted(map(str, members))])).hexdigest()
    return View(workspace_id=workspace_id, toolset_id=toolset_id, prefixed=prefixed, members=members,
                routes=routes, tools=tools_out, collisions=collisions, digest=digest, title=title)


def _capabilities(server_info: Any) -> dict[str, Any]:
    capabilities = server_info.get("capabilities") if isinstance(server_info, dict) else None
    return capabilities if isinstance(capabilities, dict) else {}


views = TTLCache(max_items=2000)
_last: dict[Any, View] = {}
"""The last view built of each endpoint, until a flush: served while its expired entry is rebuilt."""
_refreshing: set[asyncio.Task[Any]] = set()
invalidation.on_flush(views.clear)
invalidation.on_flush(_last.clear)


async def get_view(workspace_id: Any, toolset_id: Any = None) -> View | None:
    """The endpoint's view. A flush (a change made through TwinMCP) drops it at once; past its TTL
    (which only bounds changes made around TwinMCP) the last one is served while one request's
    worth of work rebuilds it in the background, so no agent waits for a thousand-tool rebuild."""
    key = ("view", workspace_id, toolset_id)
    view = views.get(key)
    if view is not None:
        return view
    last = _last.get(key)
    if last is not None:
        task = asyncio.ensure_future(_load(key, workspace_id, toolset_id))
        _refreshing.add(task)
        task.add_done_callback(_refreshed)
        return last
    return await _load(key, workspace_id, toolset_id)


def _refreshed(task: asyncio.Task[Any]) -> None:
    _refreshing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("catalog view not rebuilt (%s); the last one is served until the next try", task.exception())


async def _load(key: Any, workspace_id: Any, toolset_id: Any) -> View | None:
    view: View | None = await single_flight(
        views, key, lambda: sync_to_async(build_view, thread_sensitive=False)(workspace_id, toolset_id))
    if view is not None and views.get(key) is view:  # cached: no flush happened while it was built
        _last[key] = view
    return view
