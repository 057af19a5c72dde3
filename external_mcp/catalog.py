"""The pinned tool catalog: definitions are hashed, and a changed definition is quarantined
until an admin approves it again (protection against "rug pulls").

A listing is hostile input. The hash is taken over the definition exactly as received, so any
change is seen, even one in characters TwinMCP cannot store. A tool TwinMCP cannot accept — its
name is refused (``tool_names``), its definition has the wrong shape, cannot be stored as received
(``storable``) or is too large, or its name is listed twice with different definitions — is kept
``refused`` with the reason: agents cannot call it, admins see why, and it cannot be approved until
the server fixes it. Only a safe display form of such a definition is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from external_mcp import storable, tool_names
from external_mcp.choices import AuditAction, NotificationKind, ToolState
from external_mcp.exposed_names import exposed_names
from external_mcp.models import AuditEvent, ExternalMcpServer, ExternalMcpTool
from external_mcp.notifications import notify_admins
from twinmcp import invalidation

# Every key of a Tool (MCP 2025-11-25) that reaches an agent: a change to any is a change to review.
DEFINITION_KEYS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations", "icons",
                   "execution", "_meta")
MAX_DEFINITION_BYTES = 256 * 1024
TITLE_CHARS = 300
DESCRIPTION_CHARS = 64 * 1024


def canonical_definition(tool: dict[str, Any]) -> dict[str, Any]:
    return {key: tool[key] for key in DEFINITION_KEYS if tool.get(key) is not None}


def definition_hash(definition: dict[str, Any]) -> str:
    return _digest(storable.canonical_json(definition))


def _digest(canonical: str) -> str:
    return hashlib.sha256(storable.utf8(canonical)).hexdigest()


def is_tool_entry(raw: Any) -> bool:
    """Whether a tools/list entry can be told apart from the others: an object with a string name."""
    return isinstance(raw, dict) and isinstance(raw.get("name"), str)


@dataclass(frozen=True)
class Listed:
    """One tool of a listing as the catalog judges it."""

    key: str
    definition: dict[str, Any]
    digest: str
    size: int
    refusal: str = ""
    storable_as_is: bool = True


def _shape_problem(definition: dict[str, Any]) -> str | None:
    schema = definition.get("inputSchema")
    if schema is None:
        return "inputSchema is missing; MCP tools must have a JSON Schema object as their input schema."
    for key, wanted in (("title", str), ("description", str), ("inputSchema", dict), ("outputSchema", dict),
                        ("annotations", dict), ("icons", list), ("execution", dict), ("_meta", dict)):
        value = definition.get(key)
        if value is not None and not isinstance(value, wanted):
            kind = {str: "a string", dict: "a JSON object", list: "a JSON array"}[wanted]
            return f"{key} is a JSON {storable.json_type(value)}, not {kind}."
    return None


def _judge(raw: dict[str, Any]) -> Listed:
    name = raw["name"]
    definition = canonical_definition(raw)
    text = storable.canonical_json(definition)
    size = len(storable.utf8(text))
    digest = _digest(text)
    listed = Listed(key=tool_names.catalog_key(name), definition=definition, digest=digest, size=size)
    name_problem = tool_names.refusal(name)
    if size > MAX_DEFINITION_BYTES:
        return replace(listed, storable_as_is=False, refusal=name_problem or (
            f"The definition is {size} bytes; TwinMCP stores definitions of at most {MAX_DEFINITION_BYTES} bytes."))
    where = storable.problem(definition)
    if where:
        return replace(listed, storable_as_is=False, refusal=name_problem or (
            f"The definition cannot be stored as received: {where}."))
    return replace(listed, refusal=name_problem or _shape_problem(definition) or "")


def read_listing(tools: Iterable[Any]) -> tuple[list[Listed], int]:
    """The tools of a listing, one per catalog key, and how many entries were not tools at all."""
    groups: dict[str, list[Listed]] = {}
    ignored = 0
    for raw in tools:
        if not is_tool_entry(raw):
            ignored += 1
            continue
        listed = _judge(raw)
        groups.setdefault(listed.key, []).append(listed)
    result: list[Listed] = []
    for group in groups.values():
        if len({listed.digest for listed in group}) == 1:
            result.append(group[0])
            continue
        digest = hashlib.sha256(" ".join(listed.digest for listed in group).encode()).hexdigest()
        result.append(replace(group[0], digest=digest, refusal=(
            f"The server lists this name {len(group)} times with different definitions; agents could use any "
            "of them, so none can be approved.")))
    return result, ignored


def _text(value: Any, limit: int) -> str:
    return storable.display_text(value, limit) if isinstance(value, str) else ""


def _fill(tool: ExternalMcpTool, listed: Listed) -> None:
    if listed.storable_as_is:
        definition = listed.definition
    elif listed.size > MAX_DEFINITION_BYTES:
        definition = {"name": tool.name}
    else:
        definition = storable.safe(listed.definition)
    tool.title = _text(listed.definition.get("title"), TITLE_CHARS)
    tool.description = _text(listed.definition.get("description"), DESCRIPTION_CHARS)
    schema, output, annotations = (definition.get(k) for k in ("inputSchema", "outputSchema", "annotations"))
    tool.input_schema = schema if isinstance(schema, dict) else {}
    tool.output_schema = output if isinstance(output, dict) else None
    tool.annotations = annotations if isinstance(annotations, dict) else None
    tool.definition = definition
    tool.definition_hash = listed.digest
    tool.refusal_reason = listed.refusal


def _judged_state(tool: ExternalMcpTool, listed: Listed) -> str:
    """The state a known tool takes for this listing (REMOVED is decided by its absence)."""
    if listed.refusal:
        return ToolState.DISABLED if tool.state == ToolState.DISABLED else ToolState.REFUSED
    if tool.state in (ToolState.PENDING, ToolState.DISABLED):
        return tool.state
    if tool.approved_hash and listed.digest == tool.approved_hash:
        return ToolState.APPROVED
    return ToolState.CHANGED if tool.approved_hash else ToolState.PENDING


@transaction.atomic
def catalog_sync(*, server: ExternalMcpServer, tools: Iterable[Any],
                 now: datetime | None = None) -> list[ExternalMcpTool]:
    """Record a discovery. Returns the tools that became ``changed`` in this sync."""
    now = now or timezone.now()
    listing, _ = read_listing(tools)
    existing = {t.name: t for t in ExternalMcpTool.objects.select_for_update().filter(server=server)}
    states_before = {name: tool.state for name, tool in existing.items()}
    new_rows: list[ExternalMcpTool] = []
    updated: list[ExternalMcpTool] = []
    changed: list[ExternalMcpTool] = []
    refused: list[ExternalMcpTool] = []
    for listed in listing:
        tool = existing.get(listed.key)
        if tool is None:
            tool = ExternalMcpTool(server=server, name=listed.key, first_seen_at=now, last_seen_at=now,
                                   state=ToolState.REFUSED if listed.refusal else ToolState.PENDING)
            _fill(tool, listed)
            new_rows.append(tool)
            continue
        state = _judged_state(tool, listed)
        new_definition = listed.digest != tool.definition_hash
        if state == ToolState.CHANGED and (tool.state != ToolState.CHANGED or new_definition):
            changed.append(tool)
        if state == ToolState.REFUSED and tool.state == ToolState.APPROVED:
            refused.append(tool)
        if state in (ToolState.CHANGED, ToolState.REFUSED) and (state != tool.state or new_definition):
            tool.changed_at = now
        tool.state, tool.last_seen_at = state, now
        _fill(tool, listed)
        updated.append(tool)
    listed_keys = {listed.key for listed in listing}
    for name, tool in existing.items():
        if name not in listed_keys and tool.state != ToolState.REMOVED:
            tool.state = ToolState.REMOVED
            updated.append(tool)
    ExternalMcpTool.objects.bulk_create(new_rows)
    if new_rows or any(tool.state != states_before[tool.name] for tool in updated):
        invalidation.announce_change()
    ExternalMcpTool.objects.bulk_update(
        updated,
        ["title", "description", "input_schema", "output_schema", "annotations", "definition", "definition_hash",
         "refusal_reason", "state", "last_seen_at", "changed_at"],
    )
    for tool in changed:
        notify_admins(
            workspace_id=server.workspace_id, server=server, kind=NotificationKind.TOOL_CHANGED,
            title=f"Tool {tool.name} of {server.name} changed its definition",
            body=f"The tool {tool.name} on {server.name} now has a different definition. It is quarantined: "
                 "agents cannot call it until an admin reviews the difference and approves it again.",
            dedup_key=f"tool.changed:{tool.pk}:{tool.definition_hash}",
        )
    for tool in refused:
        notify_admins(
            workspace_id=server.workspace_id, server=server, kind=NotificationKind.TOOL_REFUSED,
            title=f"Tool {tool.name} of {server.name} was refused",
            body=f"{server.name} now lists the approved tool {tool.name} with a definition TwinMCP refuses: "
                 f"{tool.refusal_reason} Agents cannot call it until the server fixes it.",
            dedup_key=f"tool.refused:{tool.pk}:{tool.definition_hash}",
        )
    return changed


def catalog_quarantine(*, server: ExternalMcpServer, tools: Iterable[Any], now: datetime | None = None) -> int:
    """The part of a sync that cannot fail on content, for a check whose full sync could not be
    stored: every approved tool the listing does not show unchanged and acceptable stops being
    callable (only states are written). The next sync that succeeds judges them again."""
    now = now or timezone.now()
    listing = {listed.key: listed for listed in read_listing(tools)[0]}
    quarantined: list[int] = []
    removed: list[int] = []
    for tool in ExternalMcpTool.objects.select_for_update().filter(server=server, state=ToolState.APPROVED):
        listed = listing.get(tool.name)
        if listed is None:
            removed.append(tool.pk)
        elif listed.refusal or listed.digest != tool.approved_hash:
            quarantined.append(tool.pk)
    ExternalMcpTool.objects.filter(pk__in=quarantined).update(state=ToolState.CHANGED, changed_at=now)
    ExternalMcpTool.objects.filter(pk__in=removed).update(state=ToolState.REMOVED)
    if quarantined or removed:
        invalidation.announce_change()
    return len(quarantined) + len(removed)


def _select(server: ExternalMcpServer, names: list[str] | None, select_all: bool) -> list[ExternalMcpTool]:
    tools = ExternalMcpTool.objects.select_for_update().filter(server=server)
    if select_all:
        return list(tools.listed().filter(refusal_reason=""))
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


def _refuse_approval(tools: list[ExternalMcpTool]) -> None:
    refused = [f"{t.name}: {t.refusal_reason}" for t in sorted(tools, key=lambda t: t.name) if t.refusal_reason]
    if refused:
        raise ValidationError({"names": [f"Refused by TwinMCP, cannot be approved until the server fixes it: "
                                         f"{' '.join(refused)}"]})


@transaction.atomic
def tools_approve(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, names: list[str] | None = None,
                  select_all: bool = False) -> list[str]:
    now = timezone.now()
    tools = _select(server, names, select_all)
    _refuse_approval(tools)
    for tool in tools:
        tool.state = ToolState.APPROVED
        tool.approved_definition = tool.definition
        tool.approved_hash = tool.definition_hash
        tool.approved_at, tool.approved_by = now, actor
    return _switched(server, actor, tools, AuditAction.TOOLS_APPROVE,
                     ["state", "approved_definition", "approved_hash", "approved_at", "approved_by"])


@transaction.atomic
def tools_disable(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, names: list[str]) -> list[str]:
    """No agent may call them any more, on any endpoint, from the next request (the caches are
    flushed); a later discovery keeps them disabled whatever the server sends."""
    tools = _select(server, names, False)
    for tool in tools:
        tool.state = ToolState.DISABLED
    return _switched(server, actor, tools, AuditAction.TOOLS_DISABLE, ["state"])


@transaction.atomic
def tools_enable(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, names: list[str]) -> list[str]:
    """Disabled tools back to what their definition allows: approved when it is still the one an
    admin approved, quarantined (changed) when it is not, pending when it never was."""
    tools = _select(server, names, False)
    active = sorted(t.name for t in tools if t.state != ToolState.DISABLED)
    if active:
        raise ValidationError({"names": [f"Not disabled: {', '.join(active)}."]})
    for tool in tools:
        if not tool.approved_hash:
            tool.state = ToolState.PENDING
        else:
            tool.state = ToolState.APPROVED if tool.definition_hash == tool.approved_hash else ToolState.CHANGED
    return _switched(server, actor, tools, AuditAction.TOOLS_ENABLE, ["state"])


def _switched(server: ExternalMcpServer, actor: AbstractBaseUser | None, tools: list[ExternalMcpTool],
              action: str, fields: list[str]) -> list[str]:
    """Save an admin's decision on tools: every gateway process sees it from its next request, and
    the audit trail names the tools. Returns their names."""
    ExternalMcpTool.objects.bulk_update(tools, fields)
    names = sorted(t.name for t in tools)
    invalidation.announce_change()
    AuditEvent.objects.create(workspace_id=server.workspace_id, server=server, server_name=server.name,
                              actor=actor, action=action, changes={"tools": names})
    return names


def exposed_names_of(server: ExternalMcpServer) -> dict[str, str]:
    """Its tools' names where several servers meet (``exposed_names``), computed over every tool
    it lists now, so approving or disabling one tool never renames another."""
    return exposed_names(server.prefix, server.tools.listed().values_list("name", flat=True),
                         max_chars=settings.EXTERNAL_MCP_TOOL_NAME_MAX_CHARS)


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
