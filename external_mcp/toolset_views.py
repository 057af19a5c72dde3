"""Toolset pages: the list, a toolset's page (its endpoint, the tools it serves, collisions, agent
configurations), the add/edit form and the delete confirmation.

Thin like ``external_mcp.views``: members of the workspace see, its admins change, anyone else
gets a 404. Writes go through ``external_mcp.toolsets``, whose field errors land next to their
form fields.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.text import slugify
from django.views.decorators.http import require_http_methods

from external_mcp import toolsets
from external_mcp.choices import PrefixMode, ToolState
from external_mcp.exposed_names import derive_prefix
from external_mcp.forms import ToolsetForm, apply_service_errors, tool_value
from external_mcp.models import ExternalMcpServer, ExternalMcpTool, Toolset
from external_mcp.views import _is_admin, _roles, connect_context
from twinmcp.context_processors import require_external_mcp_page
from twinmcp.models import Role, Workspace


def _get_toolset(request: HttpRequest, toolset_id: Any, *, admin: bool = False) -> Toolset:
    toolset = (Toolset.objects.filter(workspace_id__in=list(_roles(request)), pk=toolset_id)
               .select_related("workspace").first())
    if toolset is None:
        raise Http404("No such toolset.")
    if admin and not _is_admin(request, toolset.workspace_id):
        raise PermissionDenied("Only admins of this toolset's workspace can do this.")
    return toolset


def _admin_workspaces(request: HttpRequest) -> list[Workspace]:
    ids = [workspace_id for workspace_id, role in _roles(request).items() if role == Role.ADMIN]
    return list(Workspace.objects.filter(pk__in=ids).order_by("name"))


def agent_name(toolset: Toolset) -> str:
    """The identifier agent configurations file the toolset under (a slug of its name)."""
    return derive_prefix(toolset.name, ()) if slugify(toolset.name) else "toolset"


# -- list ------------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET"])
def toolset_list(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    roles = _roles(request)
    rows = list(Toolset.objects.filter(workspace_id__in=list(roles)).select_related("workspace")
                .annotate(server_count=Count("servers", distinct=True), tool_count=Count("tools", distinct=True))
                .order_by(Lower("name"), "id"))
    for toolset in rows:
        toolset.can_admin = roles.get(toolset.workspace_id) == Role.ADMIN
        toolset.endpoint_url = request.build_absolute_uri(toolsets.endpoint_path(toolset.pk))
    context = {"toolsets": rows, "can_add": Role.ADMIN in roles.values(), "multi_workspace": len(roles) > 1}
    return render(request, "external_mcp/toolset_list.html", context)


# -- detail ----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET"])
def toolset_detail(request: HttpRequest, toolset_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    toolset = _get_toolset(request, toolset_id)
    servers = sorted(toolset.servers.all(), key=lambda s: s.name.lower())
    groups: dict[Any, tuple[ExternalMcpServer, list[ExternalMcpTool]]] = {}
    for tool in toolset.tools.select_related("server").order_by("server__name", "name"):
        groups.setdefault(tool.server_id, (tool.server, []))[1].append(tool)
    context = {
        "toolset": toolset, "can_admin": _is_admin(request, toolset.workspace_id),
        "servers": servers, "tool_groups": list(groups.values()), "served": toolsets.served_view(toolset),
        **connect_context(request, name=agent_name(toolset), path=toolsets.endpoint_path(toolset.pk)),
    }
    return render(request, "external_mcp/toolset_detail.html", context)


# -- add / edit ------------------------------------------------------------------------------------


def _member_choices(workspace: Workspace, toolset: Toolset | None) -> dict[str, Any]:
    """What the form offers: the workspace's servers, and its approved tools grouped by server, plus
    any member tool that is not approved now (so saving the form never drops it unseen)."""
    servers = list(ExternalMcpServer.objects.filter(workspace=workspace).order_by(Lower("name")))
    offered = ExternalMcpTool.objects.filter(server__workspace=workspace, state=ToolState.APPROVED)
    tools = list(offered.only("id", "server_id", "name", "state"))
    if toolset is not None:
        known = {t.pk for t in tools}
        tools += [t for t in toolset.tools.only("id", "server_id", "name", "state") if t.pk not in known]
    by_server: dict[Any, list[ExternalMcpTool]] = {}
    for tool in sorted(tools, key=lambda t: t.name):
        by_server.setdefault(tool.server_id, []).append(tool)
    groups = [
        {"server": server, "tools": [{"value": tool_value(server.pk, t.name), "name": t.name,
                                      "state": "" if t.state == ToolState.APPROVED else t.get_state_display()}
                                     for t in by_server[server.pk]]}
        for server in servers if server.pk in by_server
    ]
    return {
        "server_choices": [(str(s.pk), s.name) for s in servers],
        "tool_choices": [(row["value"], row["name"]) for group in groups for row in group["tools"]],
        "servers": servers,
        "tool_groups": groups,
    }


def _form_page(request: HttpRequest, *, form: ToolsetForm, members: dict[str, Any], toolset: Toolset | None,
               workspace: Workspace, workspaces: list[Workspace], status: int = 200) -> HttpResponse:
    selected_servers = set(form["servers"].value() or [])
    selected_tools = set(form["tools"].value() or [])
    context = {
        "form": form, "toolset": toolset, "workspace": workspace, "workspaces": workspaces,
        "servers": members["servers"], "tool_groups": members["tool_groups"],
        "selected_servers": selected_servers, "selected_tools": selected_tools,
    }
    return render(request, "external_mcp/toolset_form.html", context, status=status)


def _save(request: HttpRequest, form: ToolsetForm, toolset: Toolset | None, workspace: Workspace) -> Toolset | None:
    try:
        if toolset is None:
            return toolsets.toolset_create(workspace=workspace, actor=request.user, **form.service_fields())
        return toolsets.toolset_update(toolset=toolset, actor=request.user, **form.service_fields())
    except ValidationError as exc:
        apply_service_errors(exc, form)
        return None


@login_required
@require_http_methods(["GET", "POST"])
def toolset_add(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    workspaces = _admin_workspaces(request)
    if not workspaces:
        raise PermissionDenied("Only workspace admins can create toolsets.")
    wanted = request.POST.get("workspace") or request.GET.get("workspace")
    workspace = next((w for w in workspaces if str(w.pk) == wanted), workspaces[0])
    members = _member_choices(workspace, None)
    choices = {"workspaces": workspaces, "servers": members["server_choices"], "tools": members["tool_choices"]}
    if request.method == "GET":
        form = ToolsetForm(initial={"workspace": str(workspace.pk), "prefix_mode": PrefixMode.ALWAYS}, **choices)
        return _form_page(request, form=form, members=members, toolset=None, workspace=workspace,
                          workspaces=workspaces)
    form = ToolsetForm(request.POST, **choices)
    if form.is_valid():
        toolset = _save(request, form, None, workspace)
        if toolset is not None:
            messages.success(request, f"Toolset {toolset.name} created.")
            return redirect("external_mcp-ui-toolset", toolset_id=toolset.pk)
    return _form_page(request, form=form, members=members, toolset=None, workspace=workspace,
                      workspaces=workspaces, status=400)


@login_required
@require_http_methods(["GET", "POST"])
def toolset_edit(request: HttpRequest, toolset_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    toolset = _get_toolset(request, toolset_id, admin=True)
    members = _member_choices(toolset.workspace, toolset)
    choices = {"servers": members["server_choices"], "tools": members["tool_choices"]}
    if request.method == "GET":
        initial = {"name": toolset.name, "description": toolset.description, "prefix_mode": toolset.prefix_mode,
                   "servers": [str(pk) for pk in toolset.servers.values_list("pk", flat=True)],
                   "tools": [tool_value(s, n) for s, n in toolset.tools.values_list("server_id", "name")]}
        form = ToolsetForm(initial=initial, **choices)
        return _form_page(request, form=form, members=members, toolset=toolset, workspace=toolset.workspace,
                          workspaces=[])
    form = ToolsetForm(request.POST, **choices)
    if form.is_valid() and _save(request, form, toolset, toolset.workspace) is not None:
        messages.success(request, f"Toolset {form.cleaned_data['name']} saved.")
        return redirect("external_mcp-ui-toolset", toolset_id=toolset.pk)
    return _form_page(request, form=form, members=members, toolset=toolset, workspace=toolset.workspace,
                      workspaces=[], status=400)


# -- delete ----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def toolset_delete(request: HttpRequest, toolset_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    toolset = _get_toolset(request, toolset_id, admin=True)
    if request.method == "POST":
        name = toolset.name
        toolsets.toolset_delete(toolset=toolset, actor=request.user)
        messages.success(request, f"Toolset {name} deleted.")
        return redirect("external_mcp-ui-toolsets")
    endpoint_url = request.build_absolute_uri(toolsets.endpoint_path(toolset.pk))
    return render(request, "external_mcp/toolset_confirm_delete.html",
                  {"toolset": toolset, "endpoint_url": endpoint_url})
