"""The pinned tool catalog: definitions are hashed, and a changed definition is quarantined
until an admin approves it again (protection against "rug pulls")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from external_mcp.choices import AuditAction, NotificationKind, ToolState
from external_mcp.models import AuditEvent, ExternalMcpServer, ExternalMcpTool
from external_mcp.notifications import notify_admins
from twinmcp import invalidation

DEFINITION_KEYS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


def canonical_definition(tool: dict[str, Any]) -> dict[str, Any]:
    return {key: tool[key] for key in DEFINITION_KEYS if tool.get(key) is not None}


def definition_hash(definition: dict[str, Any]) -> str:
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _fill(tool: ExternalMcpTool, definition: dict[str, Any], digest: str) -> None:
    tool.title = str(definition.get("title") or "")[:300]
    tool.description = str(definition.get("description") or "")
    schema = definition.get("inputSchema")
    tool.input_schema = schema if isinstance(schema, dict) else {}
    tool.output_schema = definition.get("outputSchema")
    tool.annotations = definition.get("annotations")
    tool.definition = definition
    tool.definition_hash = digest


@transaction.atomic
def catalog_sync(*, server: ExternalMcpServer, tools: Iterable[dict[str, Any]],
                 now: datetime | None = None) -> list[ExternalMcpTool]:
    """Record a discovery. Returns the tools that became ``changed`` in this sync."""
    now = now or timezone.now()
    existing = {t.name: t for t in ExternalMcpTool.objects.select_for_update().filter(server=server)}
    states_before = {name: tool.state for name, tool in existing.items()}
    new_rows: list[ExternalMcpTool] = []
    updated: list[ExternalMcpTool] = []
    changed: list[ExternalMcpTool] = []
    seen: set[str] = set()
    for raw in tools:
        definition = canonical_definition(raw)
        name = definition["name"][:200]
        if name in seen:
            continue
        seen.add(name)
        digest = definition_hash(definition)
        tool = existing.get(name)
        if tool is None:
            tool = ExternalMcpTool(server=server, name=name, state=ToolState.PENDING, first_seen_at=now,
                                   last_seen_at=now)
            _fill(tool, definition, digest)
            new_rows.append(tool)
            continue
        tool.last_seen_at = now
        if tool.state == ToolState.REMOVED:
            if not tool.approved_hash:
                tool.state = ToolState.PENDING
            elif digest == tool.approved_hash:
                tool.state = ToolState.APPROVED
            else:
                tool.state, tool.changed_at = ToolState.CHANGED, now
                changed.append(tool)
        elif digest != tool.definition_hash:
            if tool.state == ToolState.APPROVED:
                tool.state, tool.changed_at = ToolState.CHANGED, now
                changed.append(tool)
            elif tool.state == ToolState.CHANGED and digest == tool.approved_hash:
                tool.state = ToolState.APPROVED
        _fill(tool, definition, digest)
        updated.append(tool)
    for name, tool in existing.items():
        if name not in seen and tool.state != ToolState.REMOVED:
            tool.state = ToolState.REMOVED
            updated.append(tool)
    ExternalMcpTool.objects.bulk_create(new_rows)
    if new_rows or any(tool.state != states_before[tool.name] for tool in updated):
        invalidation.announce_change()
    ExternalMcpTool.objects.bulk_update(
        updated,
        ["title", "description", "input_schema", "output_schema", "annotations", "definition", "definition_hash",
         "state", "last_seen_at", "changed_at"],
    )
    for tool in changed:
        notify_admins(
            workspace_id=server.workspace_id, server=server, kind=NotificationKind.TOOL_CHANGED,
            title=f"Tool {tool.name} of {server.name} changed its definition",
            body=f"The tool {tool.name} on {server.name} now has a different definition. It is quarantined: "
                 "agents cannot call it until an admin reviews the difference and approves it again.",
            dedup_key=f"tool.changed:{tool.pk}:{tool.definition_hash}",
        )
    return changed


def _select(server: ExternalMcpServer, names: list[str] | None, select_all: bool) -> list[ExternalMcpTool]:
    tools = ExternalMcpTool.objects.select_for_update().filter(server=server)
    if select_all:
        return list(tools.exclude(state=ToolState.REMOVED))
    if not names:
        raise ValidationError({"names": ["Give tool names, or all=true."]})
    found = {t.name: t for t in tools.filter(name__in=names)}
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise ValidationError({"names": [f"Unknown tool(s): {', '.join(unknown)}."]})
    removed = sorted(n for n, t in found.items() if t.state == ToolState.REMOVED)
    if removed:
        raise ValidationError({"names": [f"Removed by the server, cannot change: {', '.join(removed)}."]})
    return list(found.values())


@transaction.atomic
def tools_approve(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, names: list[str] | None = None,
                  select_all: bool = False) -> list[str]:
    now = timezone.now()
    tools = _select(server, names, select_all)
    for tool in tools:
        tool.state = ToolState.APPROVED
        tool.approved_definition = tool.definition
        tool.approved_hash = tool.definition_hash
        tool.approved_at, tool.approved_by = now, actor
    ExternalMcpTool.objects.bulk_update(tools, ["state", "approved_definition", "approved_hash", "approved_at",
                                                "approved_by"])
    approved = sorted(t.name for t in tools)
    invalidation.announce_change()
    AuditEvent.objects.create(workspace_id=server.workspace_id, server=server, server_name=server.name,
                              actor=actor, action=AuditAction.TOOLS_APPROVE, changes={"tools": approved})
    return approved


@transaction.atomic
def tools_disable(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, names: list[str]) -> list[str]:
    tools = _select(server, names, False)
    for tool in tools:
        tool.state = ToolState.DISABLED
    ExternalMcpTool.objects.bulk_update(tools, ["state"])
    disabled = sorted(t.name for t in tools)
    invalidation.announce_change()
    AuditEvent.objects.create(workspace_id=server.workspace_id, server=server, server_name=server.name,
                              actor=actor, action=AuditAction.TOOLS_DISABLE, changes={"tools": disabled})
    return disabled


@transaction.atomic
def tools_reset_approvals(*, server: ExternalMcpServer) -> list[str]:
    """Forget every approval of a server whose origin changed: what an admin approved on one host says
    nothing about another. Tools return to pending (removed ones stay removed, without approval), so
    nothing is callable until an admin approves it again. Returns the names sent back to pending; the
    caller audits the change that caused it."""
    tools = list(ExternalMcpTool.objects.select_for_update().filter(server=server))
    for tool in tools:
        if tool.state != ToolState.REMOVED:
            tool.state = ToolState.PENDING
        tool.approved_definition, tool.approved_hash, tool.approved_at, tool.approved_by = None, "", None, None
        tool.changed_at = None
    ExternalMcpTool.objects.bulk_update(tools, ["state", "approved_definition", "approved_hash", "approved_at",
                                                "approved_by", "changed_at"])
    invalidation.announce_change()
    return sorted(t.name for t in tools if t.state != ToolState.REMOVED)
