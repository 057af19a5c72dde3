"""Toolsets: named subsets of a workspace's servers and tools, each with its own MCP endpoint
(``/api/v1/external-mcp/toolsets/<id>/mcp``, served by ``external_mcp.gateway.aggregate``).

Writes validate, audit and announce the change, so every gateway process drops the view it
cached of the toolset. Members are named by server UUIDs and tool names, never by integer keys.

What a toolset serves is what the gateway serves: ``served_catalog.view_of`` for one toolset,
``views_of`` for a page of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from external_mcp import served_catalog
from external_mcp.choices import AuditAction, PrefixMode
from external_mcp.models import AuditEvent, ExternalMcpServer, ExternalMcpTool, Toolset
from twinmcp import invalidation
from twinmcp.models import Workspace

ENDPOINT_PATH = "/api/v1/external-mcp/toolsets/{id}/mcp"
WORKSPACE_ENDPOINT_PATH = "/api/v1/external-mcp/mcp"
NAME_MAX_CHARS = 100
DESCRIPTION_MAX_CHARS = 2000
EDITABLE_FIELDS = ("name", "description", "prefix_mode", "servers", "tools")
MEMBERSHIP_FIELDS = {"prefix_mode", "servers", "tools"}
SHOWN_UNKNOWN = 5
"""How many unknown ids or names an error lists before "and N more"."""


def endpoint_path(toolset_id: Any) -> str:
    return ENDPOINT_PATH.format(id=toolset_id)


# -- what a toolset serves --------------------------------------------------------------------------


@dataclass(frozen=True)
class Collision:
    """A tool name two members share: an unprefixed toolset serves both under their prefixed names."""

    name: str
    servers: tuple[tuple[Any, str], ...]
    """(id, name) of each server that has it, by name."""

    def text(self) -> str:
        return f"{self.name} ({', '.join(name for _, name in self.servers)})"


@dataclass(frozen=True)
class Served:
    exposed_tools: list[str]
    """The names an agent sees in ``tools/list`` now, sorted."""
    collisions: list[Collision]
    """Only ever non-empty for a toolset that is never prefixed."""


def _collision(name: str, holders: Iterable[tuple[Any, str]]) -> Collision:
    return Collision(name, tuple(sorted(set(holders), key=lambda h: (h[1].lower(), str(h[0])))))


def _served(view: served_catalog.View | None) -> Served:
    if view is None:
        return Served([], [])
    collisions = [
        _collision(name, ((route.server_id, view.members[route.server_id].name)
                          for route in view.routes.values() if route.name == name))
        for name in view.collisions
    ]
    return Served([tool["name"] for tool in view.tools], collisions)


def served_view(toolset: Toolset) -> Served:
    """What the toolset's endpoint serves now, as the gateway computes it (it sees this
    transaction's uncommitted changes: the prefix-mode rule depends on it)."""
    return _served(served_catalog.view_of(toolset.workspace_id, toolset.pk))


def served_many(toolsets: Sequence[Toolset]) -> dict[Any, Served]:
    """``served_view`` of each toolset (with ``servers`` and ``tools`` prefetched), in a fixed number
    of queries whatever their number."""
    return {toolset_id: _served(view) for toolset_id, view in served_catalog.views_of(toolsets).items()}


# -- writes -----------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _more(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_UNKNOWN])
    return shown + (f" and {len(items) - SHOWN_UNKNOWN} more" if len(items) > SHOWN_UNKNOWN else "")


def _a_list(value: Any, field: str, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValidationError({field: [f"A list of {what} is expected."]})
    return list(value)


def _server_id(value: Any, field: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        if not isinstance(value, str):
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError({field: [f"{_shown(value)} is not a server id (a UUID)."]}) from None


def _clean_servers(workspace: Workspace, value: Any) -> list[ExternalMcpServer]:
    ids = list(dict.fromkeys(_server_id(item, "servers") for item in _a_list(value, "servers", "server ids")))
    found = {s.pk: s for s in ExternalMcpServer.objects.filter(workspace=workspace, pk__in=ids)}
    unknown = [str(i) for i in ids if i not in found]
    if unknown:
        raise ValidationError({"servers": [f"No server {_more(unknown)} in this workspace."]})
    return [found[i] for i in ids]


TOOL_SHAPE = 'Each tool is {"server": <server id>, "name": <tool name>}'


def _clean_tools(workspace: Workspace, value: Any) -> list[ExternalMcpTool]:
    wanted: dict[tuple[uuid.UUID, str], None] = {}
    for item in _a_list(value, "tools", "tools"):
        if not isinstance(item, dict) or set(item) != {"server", "name"} or not isinstance(item["name"], str):
            raise ValidationError({"tools": [f"{TOOL_SHAPE}, not {_shown(item)}."]})
        wanted[(_server_id(item["server"], "tools"), item["name"])] = None
    searchable = [pair for pair in wanted if "\x00" not in pair[1]]  # no stored name has one
    rows = ExternalMcpTool.objects.filter(server__workspace=workspace, server_id__in={s for s, _ in searchable},
                                          name__in={n for _, n in searchable}) if searchable else []
    found = {(t.server_id, t.name): t for t in rows}
    unknown = [f"{name!r} on server {server_id}" for server_id, name in wanted if (server_id, name) not in found]
    if unknown:
        raise ValidationError({"tools": [f"No tool {_more(unknown)} in this workspace."]})
    return [found[pair] for pair in wanted]


def _clean_fields(toolset: Toolset, fields: dict[str, Any]) -> dict[str, Any]:
    """Set the validated plain fields; return what changed, for the audit trail."""
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "name":
            if not isinstance(value, str) or not value.strip():
                raise ValidationError({"name": ["This field is required."]})
            value = value.strip()
            if len(value) > NAME_MAX_CHARS:
                raise ValidationError({"name": [f"At most {NAME_MAX_CHARS} characters."]})
        elif key == "description":
            value = "" if value is None else value
            if not isinstance(value, str) or len(value) > DESCRIPTION_MAX_CHARS:
                raise ValidationError({"description": [f"Text of at most {DESCRIPTION_MAX_CHARS} characters."]})
        elif key == "prefix_mode" and value not in PrefixMode.values:
            raise ValidationError({"prefix_mode": [f"Choose one of {', '.join(PrefixMode.values)}."]})
        if getattr(toolset, key) != value:
            changes[key] = value
            setattr(toolset, key, value)
    return changes


def _save(toolset: Toolset) -> None:
    try:
        with transaction.atomic():
            toolset.save()
    except IntegrityError:
        raise ValidationError({"name": ["A toolset with this name already exists in this workspace."]}) from None


def _refuse_collisions(toolset: Toolset) -> None:
    """Unprefixed names must be unique: checked on what the endpoint would serve after the change."""
    collisions = served_view(toolset).collisions
    if collisions:
        raise ValidationError({"prefix_mode": [
            f"Tool names collide, so this toolset cannot serve them unprefixed: "
            f"{', '.join(c.text() for c in collisions)}. Leave out one of each, or keep prefix_mode 'always'."]})


def _server_ids(servers: Iterable[ExternalMcpServer]) -> list[str]:
    return sorted(str(server.pk) for server in servers)


def _tool_refs(tools: Iterable[ExternalMcpTool]) -> list[dict[str, str]]:
    return sorted(({"server": str(tool.server_id), "name": tool.name} for tool in tools),
                  key=lambda ref: (ref["server"], ref["name"]))


def _audit(*, toolset: Toolset, actor: AbstractBaseUser | None, action: str, changes: dict[str, Any]) -> None:
    """Toolset events belong to no server; ``server_name`` carries the toolset's name, so the audit
    list reads "Toolset updated · <name>"."""
    AuditEvent.objects.create(workspace_id=toolset.workspace_id, server=None, server_name=toolset.name, actor=actor,
                              action=action, changes={"toolset": str(toolset.pk), **changes})


@transaction.atomic
def toolset_create(
    *,
    workspace: Workspace,
    actor: AbstractBaseUser | None,
    name: str,
    description: str = "",
    prefix_mode: str = PrefixMode.ALWAYS,
    servers: Sequence[Any] = (),
    tools: Sequence[dict[str, Any]] = (),
) -> Toolset:
    """``servers``: ids of the workspace's servers (all their approved tools, now and later);
    ``tools``: ``{"server": <id>, "name": <tool name>}`` of single tools."""
    toolset = Toolset(workspace=workspace, created_by=actor)
    changes = _clean_fields(toolset, {"name": name, "description": description, "prefix_mode": prefix_mode})
    server_rows = _clean_servers(workspace, servers)
    tool_rows = _clean_tools(workspace, tools)
    _save(toolset)
    toolset.servers.set(server_rows)
    toolset.tools.set(tool_rows)
    if toolset.prefix_mode == PrefixMode.NEVER:
        _refuse_collisions(toolset)
    changes.update(prefix_mode=toolset.prefix_mode, servers=_server_ids(server_rows), tools=_tool_refs(tool_rows))
    _audit(toolset=toolset, actor=actor, action=AuditAction.TOOLSET_CREATE, changes=changes)
    invalidation.announce_change()
    return toolset


@transaction.atomic
def toolset_update(*, toolset: Toolset, actor: AbstractBaseUser | None, **fields: Any) -> Toolset:
    """Change any of ``EDITABLE_FIELDS``; ``servers`` and ``tools`` replace the members they name."""
    for key in fields:
        if key not in EDITABLE_FIELDS:
            raise ValidationError({key: ["This field cannot be changed here."]})
    toolset = Toolset.objects.select_for_update().get(pk=toolset.pk)
    changes = _clean_fields(toolset, {k: v for k, v in fields.items() if k in ("name", "description", "prefix_mode")})
    if "servers" in fields:
        server_rows = _clean_servers(toolset.workspace, fields["servers"])
        if _server_ids(server_rows) != _server_ids(toolset.servers.all()):
            changes["servers"] = _server_ids(server_rows)
            toolset.servers.set(server_rows)
    if "tools" in fields:
        tool_rows = _clean_tools(toolset.workspace, fields["tools"])
        if _tool_refs(tool_rows) != _tool_refs(toolset.tools.all()):
            changes["tools"] = _tool_refs(tool_rows)
            toolset.tools.set(tool_rows)
    if not changes:
        return toolset
    _save(toolset)
    if toolset.prefix_mode == PrefixMode.NEVER and MEMBERSHIP_FIELDS & changes.keys():
        _refuse_collisions(toolset)
    _audit(toolset=toolset, actor=actor, action=AuditAction.TOOLSET_UPDATE, changes=changes)
    invalidation.announce_change()
    return toolset


@transaction.atomic
def toolset_delete(*, toolset: Toolset, actor: AbstractBaseUser | None) -> None:
    _audit(toolset=toolset, actor=actor, action=AuditAction.TOOLSET_DELETE, changes={})
    toolset.delete()
    invalidation.announce_change()
