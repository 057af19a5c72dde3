"""The usage alerts pages: the rules of the workspaces the caller administers (with their last
breach), the add/edit form, enable/disable and delete.

Admins only: a member gets 403, a rule of a workspace the caller is not in is a 404. Writes go
through ``usage.alerts``, whose field errors land next to their form fields.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_http_methods

from external_mcp.forms import apply_service_errors
from external_mcp.models import ExternalMcpServer
from external_mcp.views import _is_admin, _partial, _roles
from twinmcp.context_processors import require_external_mcp_page
from twinmcp.models import Role, Workspace
from usage import alerts
from usage.alert_forms import AlertRuleForm
from usage.models import AlertRule


def _admin_workspaces(request: HttpRequest) -> list[Workspace]:
    ids = [workspace_id for workspace_id, role in _roles(request).items() if role == Role.ADMIN]
    if not ids:
        raise PermissionDenied("Only workspace admins can manage usage alerts.")
    return list(Workspace.objects.filter(pk__in=ids).order_by("name"))


def _get_rule(request: HttpRequest, rule_id: Any) -> AlertRule:
    rule = (AlertRule.objects.filter(workspace_id__in=list(_roles(request)), pk=rule_id)
            .select_related("workspace", "member", "server").first())
    if rule is None:
        raise Http404("No such alert rule.")
    if not _is_admin(request, rule.workspace_id):
        raise PermissionDenied("Only admins of this rule's workspace can do this.")
    return rule


def _choices(workspace: Workspace) -> dict[str, list[tuple[str, str]]]:
    """The workspace's own members and servers: a form never offers another workspace's."""
    users = get_user_model().objects.filter(memberships__workspace=workspace).order_by("username")
    servers = ExternalMcpServer.objects.filter(workspace=workspace).order_by(Lower("name"))
    return {"members": [(str(u.pk), u.get_username()) for u in users],
            "servers": [(str(s.pk), s.name) for s in servers.only("id", "name")]}


# -- list ------------------------------------------------------------------------------------------


def _list_context(workspaces: list[Workspace]) -> dict[str, Any]:
    rules = list(AlertRule.objects.filter(workspace__in=workspaces).select_related("workspace", "member", "server")
                 .with_last_breach().order_by("workspace__name", "created_at", "id"))
    for rule in rules:
        rule.sentence = alerts.describe(rule)
    return {"rules": rules, "workspaces": workspaces, "multi_workspace": len(workspaces) > 1}


def _render_list(request: HttpRequest, workspaces: list[Workspace], announce: str = "") -> HttpResponse:
    template = "usage/alerts.html#alert-table" if _partial(request) else "usage/alerts.html"
    response = render(request, template, {**_list_context(workspaces), "announce": announce})
    patch_vary_headers(response, ("HX-Request",))
    return response


@login_required
@require_http_methods(["GET"])
def alert_list(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    return _render_list(request, _admin_workspaces(request))


# -- add / edit ------------------------------------------------------------------------------------


def _form_page(request: HttpRequest, *, form: AlertRuleForm, rule: AlertRule | None, workspace: Workspace,
               workspaces: list[Workspace], status: int = 200) -> HttpResponse:
    context = {"form": form, "rule": rule, "workspace": workspace, "workspaces": workspaces}
    return render(request, "usage/alerts_form.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def alert_add(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    workspaces = _admin_workspaces(request)
    wanted = request.POST.get("workspace") or request.GET.get("workspace")
    workspace = next((w for w in workspaces if str(w.pk) == wanted), workspaces[0])
    choices = _choices(workspace)
    if request.method == "GET":
        form = AlertRuleForm(**choices)
        return _form_page(request, form=form, rule=None, workspace=workspace, workspaces=workspaces)
    form = AlertRuleForm(request.POST, **choices)
    if form.is_valid():
        try:
            alerts.alert_rule_create(workspace=workspace, actor=request.user, **form.service_fields())
        except ValidationError as exc:
            apply_service_errors(exc, form)
        else:
            messages.success(request, "Alert rule created.")
            return redirect("usage-ui-alerts")
    return _form_page(request, form=form, rule=None, workspace=workspace, workspaces=workspaces, status=400)


@login_required
@require_http_methods(["GET", "POST"])
def alert_edit(request: HttpRequest, rule_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    rule = _get_rule(request, rule_id)
    choices = _choices(rule.workspace)
    if request.method == "GET":
        initial = {"kind": rule.kind, "member": str(rule.member_id or ""), "server": str(rule.server_id or ""),
                   "threshold": rule.threshold, "min_calls": rule.min_calls, "enabled": rule.enabled}
        form = AlertRuleForm(initial=initial, **choices)
        return _form_page(request, form=form, rule=rule, workspace=rule.workspace, workspaces=[])
    form = AlertRuleForm(request.POST, **choices)
    if form.is_valid():
        try:
            alerts.alert_rule_update(rule=rule, actor=request.user, **form.service_fields())
        except ValidationError as exc:
            apply_service_errors(exc, form)
        else:
            messages.success(request, "Alert rule saved.")
            return redirect("usage-ui-alerts")
    return _form_page(request, form=form, rule=rule, workspace=rule.workspace, workspaces=[], status=400)


# -- enable / disable, delete -----------------------------------------------------------------------


@login_required
@require_http_methods(["POST"])
def alert_toggle(request: HttpRequest, rule_id: Any) -> HttpResponse:
    """Enable or disable; an htmx request gets the refreshed table back, a plain form the page."""
    require_external_mcp_page(request)
    rule = _get_rule(request, rule_id)
    rule = alerts.alert_rule_update(rule=rule, actor=request.user, enabled=not rule.enabled)
    done = f"Alert rule {'enabled' if rule.enabled else 'disabled'}: {alerts.describe(rule)}."
    if _partial(request):
        return _render_list(request, _admin_workspaces(request), announce=done)
    messages.success(request, done)
    return redirect("usage-ui-alerts")


@login_required
@require_http_methods(["GET", "POST"])
def alert_delete(request: HttpRequest, rule_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    rule = _get_rule(request, rule_id)
    if request.method == "POST":
        alerts.alert_rule_delete(rule=rule, actor=request.user)
        messages.success(request, "Alert rule deleted.")
        return redirect("usage-ui-alerts")
    return render(request, "usage/alerts_confirm_delete.html", {"rule": rule, "sentence": alerts.describe(rule)})
