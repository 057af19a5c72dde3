"""Admin pages of the server registry (server-rendered, htmx-enhanced).

Thin: each view checks the feature flag and the caller's role, reads with the ORM, writes through
``external_mcp.services`` / ``catalog`` / ``inbox``, and renders. One view serves a page and its
htmx partial (``request.htmx`` → ``template.html#partial``). Members see; workspace admins act;
anyone else gets a 404 for a server that is not theirs.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Case, Count, IntegerField, Q, QuerySet, Value, When
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from external_mcp import (
    catalog,
    connections,
    health,
    server_live,
    services,
    staleness,
    storable,
    tool_names,
)
from external_mcp.agent_configs import agent_configs
from external_mcp.choices import (
    STATUS_COLOURS,
    STATUS_SORT_ORDER,
    AuthType,
    CredentialMode,
    ServerStatus,
    ToolState,
    Transport,
)
from external_mcp.forms import (
    CredentialsForm,
    ServerFilterForm,
    ServerForm,
    apply_service_errors,
    credentials_form,
    own_credentials_form,
)
from external_mcp.models import ExternalMcpServer, ExternalMcpTool
from external_mcp.oauth import flow
from twinmcp.api_errors import LimitReached
from twinmcp.context_processors import poll_ms, require_external_mcp_page
from twinmcp.models import Membership, Role, Workspace

logger = logging.getLogger(__name__)

# A shape next to the label: the status is never told by colour alone.
STATUS_ICONS = {
    ServerStatus.DOWN: "✕",
    ServerStatus.WARNING: "!",
    ServerStatus.NEEDS_AUTH: "🔑",
    ServerStatus.NEW: "•",
    ServerStatus.HEALTHY: "✓",
    ServerStatus.DISABLED: "–",
    ServerStatus.STALE: "?",
}
# What a failed connection test means, in the words an admin looks for.
ERROR_LABELS = {
    "protocol": "Handshake failed",
    "tls": "Invalid certificate (TLS handshake failed)",
    "auth": "Authentication refused",
    "policy": "URL refused by policy",
    "timeout": "Timeout",
    "connect": "Connection refused",
    "dns": "Host name not found",
    "http": "Unexpected HTTP answer",
    "credentials": "Stored credentials unusable",
    "record": "Result could not be recorded",
}
TOOL_STATE_ORDER = {ToolState.CHANGED: 0, ToolState.REFUSED: 1, ToolState.PENDING: 2, ToolState.APPROVED: 3,
                    ToolState.DISABLED: 4, ToolState.REMOVED: 5}
APPROVABLE_STATES = (ToolState.PENDING, ToolState.CHANGED, ToolState.DISABLED)
EXPIRY_WARNING = timedelta(days=30)


# -- helpers ---------------------------------------------------------------------------------------


def _partial(request: HttpRequest) -> bool:
    """An htmx request that wants a fragment (a history restore wants the whole page)."""
    return bool(request.htmx) and not request.htmx.history_restore_request


def _render(request: HttpRequest, template: str, context: dict, partial: str | None = None,
            status: int = 200) -> HttpResponse:
    name = f"{template}#{partial}" if partial and _partial(request) else template
    response = render(request, name, context, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response


def _roles(request: HttpRequest) -> dict[Any, str]:
    """workspace_id -> role of the caller, one query per request."""
    roles = getattr(request, "_twinmcp_roles", None)
    if roles is None:
        roles = dict(Membership.objects.filter(user=request.user).values_list("workspace_id", "role"))
        request._twinmcp_roles = roles  # type: ignore[attr-defined]
    return roles


def _is_admin(request: HttpRequest, workspace_id: Any) -> bool:
    return _roles(request).get(workspace_id) == Role.ADMIN


def _servers(request: HttpRequest) -> QuerySet[ExternalMcpServer]:
    return ExternalMcpServer.objects.visible_to(request.user)


def _get_server(request: HttpRequest, server_id: Any, *, admin: bool = False) -> ExternalMcpServer:
    server = _servers(request).select_related("workspace", "credential").filter(pk=server_id).first()
    if server is None:
        raise Http404("No such server.")
    if admin and not _is_admin(request, server.workspace_id):
        raise PermissionDenied("Only admins of this server's workspace can do this.")
    return server


def _next_url(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, require_https=request.is_secure()):
        return target
    return default


def badge(status: str) -> dict[str, str]:
    value = ServerStatus(status)
    return {"value": value.value, "label": value.label, "colour": STATUS_COLOURS[value],
            "icon": STATUS_ICONS[value]}


def server_badge(server: ExternalMcpServer) -> dict[str, str]:
    """The badge of the status to show: the recorded one, or stale when checks have stopped."""
    return badge(staleness.shown_status(server))


def _status_order() -> Case:
    return Case(*[When(shown_status=s, then=Value(o)) for s, o in STATUS_SORT_ORDER.items()],
                default=Value(len(STATUS_SORT_ORDER)), output_field=IntegerField())


@dataclass(frozen=True)
class DiffRow:
    kind: str  # "context", "removed", "added" or "gap"
    old_no: int | None
    new_no: int | None
    text: str

    @property
    def marker(self) -> str:
        return {"removed": "-", "added": "+", "gap": "…"}.get(self.kind, "")


def definition_diff(old: Any, new: Any, *, context: int = 3) -> list[DiffRow]:
    """Rows of a line diff between two pretty-printed JSON definitions (hunks with context).
    Invisible characters (zero-width, bidirectional controls, tags) are shown, since a definition
    can hide instructions in them."""
    a = storable.display_text(json.dumps(old or {}, indent=2, sort_keys=True, ensure_ascii=False)).splitlines()
    b = storable.display_text(json.dumps(new or {}, indent=2, sort_keys=True, ensure_ascii=False)).splitlines()
    rows: list[DiffRow] = []
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context):
        if rows:
            rows.append(DiffRow("gap", None, None, ""))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows.extend(DiffRow("context", i + 1, j1 + (i - i1) + 1, a[i]) for i in range(i1, i2))
                continue
            if tag in ("replace", "delete"):
                rows.extend(DiffRow("removed", i + 1, None, a[i]) for i in range(i1, i2))
            if tag in ("replace", "insert"):
                rows.extend(DiffRow("added", None, j + 1, b[j]) for j in range(j1, j2))
    return rows


def _tools(server: ExternalMcpServer) -> list[ExternalMcpTool]:
    tools = sorted(server.tools.all(), key=lambda t: (TOOL_STATE_ORDER.get(t.state, 9), t.name))
    exposed = catalog.exposed_names_of(server)
    for tool in tools:
        tool.exposed_name = exposed.get(tool.name)
        tool.approvable = tool.state in APPROVABLE_STATES and not tool.refusal_reason
        tool.name_conforms = tool_names.conforms(tool.name)
        if tool.state == ToolState.CHANGED:
            tool.diff = definition_diff(tool.approved_definition, tool.definition)
    return tools


def _tools_context(request: HttpRequest, server: ExternalMcpServer, **extra: Any) -> dict[str, Any]:
    tools = _tools(server)
    return {"server": server, "tools": tools, "can_admin": _is_admin(request, server.workspace_id),
            "approvable_count": sum(1 for t in tools if t.approvable), **extra}


def _expiry(when: Any, now: Any) -> dict[str, Any] | None:
    if when is None:
        return None
    left = when - now
    return {"at": when, "expired": left <= timedelta(0), "soon": left <= EXPIRY_WARNING, "days": left.days}


def _credential_context(server: ExternalMcpServer) -> dict[str, Any]:
    credential = getattr(server, "credential", None) if server.auth_type != AuthType.NONE else None
    now = timezone.now()
    return {
        "credential": credential,
        "cert_expiry": _expiry(credential.cert_not_after, now) if credential else None,
        "secret_expiry": _expiry(credential.expires_at, now) if credential else None,
    }


def _prefill(server: ExternalMcpServer | None, auth_type: str) -> dict[str, str]:
    """Non-secret fields of the stored payload (the API-key header name) to show again."""
    if server is None or auth_type != server.auth_type or auth_type != AuthType.API_KEY:
        return {}
    try:
        payload = services.credentials_payload(server=server) or {}
    except services.CredentialUnavailable:
        return {}
    return {"header": payload.get("header", "")}


def _all_valid(*forms_: Any) -> bool:
    """Validate every form (no short-circuit), so each shows its own errors."""
    return all([form.is_valid() for form in forms_])


def _cred_form(server: ExternalMcpServer | None, auth_type: str, data: Any = None,
               files: Any = None, owner: Any = None) -> CredentialsForm:
    return credentials_form(auth_type, data, files, initial=_prefill(server, auth_type), owner=owner)


# -- servers list ----------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET"])
def server_list(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    filters = ServerFilterForm(request.GET or None)
    not_removed = ~Q(tools__state=ToolState.REMOVED)
    now = timezone.now()
    servers = _servers(request).select_related("workspace").with_shown_status(now).annotate(
        tool_count=Count("tools", filter=not_removed),
        pending_count=Count("tools", filter=Q(tools__state=ToolState.PENDING)),
        changed_count=Count("tools", filter=Q(tools__state=ToolState.CHANGED)),
        status_order=_status_order(),
    )
    if filters.is_valid():
        data = filters.cleaned_data
        if data.get("status"):
            servers = servers.filter(shown_status=data["status"])
        if data.get("tag"):
            servers = servers.with_tag(data["tag"])
        if data.get("search"):
            servers = servers.search(data["search"])
    rows = list(servers.order_by("status_order", Lower("name")))
    roles = _roles(request)
    for server in rows:
        server.badge = badge(server.shown_status)
        server.can_admin = roles.get(server.workspace_id) == Role.ADMIN
    context = {
        "servers": rows,
        "filters": filters,
        "filtered": bool(request.GET.get("status") or request.GET.get("tag") or request.GET.get("search")),
        "can_add": Role.ADMIN in roles.values(),
        "multi_workspace": len(roles) > 1,
        "poll_ms": poll_ms(),
        "list_url": request.get_full_path(),
    }
    if not _partial(request):
        tags = _servers(request).values_list("tags", flat=True)
        context["known_tags"] = sorted({tag for row in tags for tag in (row or [])})
    return _render(request, "external_mcp/server_list.html", context, partial="server-table")


# -- add / edit ------------------------------------------------------------------------------------


def _form_page(request: HttpRequest, *, server: ExternalMcpServer | None, form: ServerForm,
               cred_form: CredentialsForm, status: int = 200, **extra: Any) -> HttpResponse:
    auth_type = cred_form.auth_type
    context = {**extra,
        "server": server, "form": form, "cred_form": cred_form, "auth_type": auth_type,
        "auth_label": AuthType(auth_type).label,
        "same_auth": server is not None and auth_type == server.auth_type,
        "oauth_redirect_uri": flow.redirect_uri(),
        **(_credential_context(server) if server is not None else {}),
    }
    if server is not None:
        context.update(_tools_context(request, server))
        context["server_badge"] = server_badge(server)
    partial = "auth-fields" if request.htmx and request.htmx.trigger_name == "auth_type" else None
    return _render(request, "external_mcp/server_form.html", context, partial=partial, status=status)


def workspaces_to_add_to(request: HttpRequest) -> list[Workspace]:
    """The workspaces the caller administers, where a server may be added (or tried before): none is a 403."""
    admin_of = [m.workspace for m in Membership.objects.of_user(request.user).admins()
                .select_related("workspace").order_by("workspace__name")]
    if not admin_of:
        raise PermissionDenied("Only workspace admins can add servers.")
    return admin_of


@login_required
@require_http_methods(["GET", "POST"])
def server_add(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    admin_of = workspaces_to_add_to(request)
    if request.method == "GET":
        auth_type = request.GET.get("auth_type") or AuthType.NONE
        form = ServerForm(initial={"auth_type": auth_type}, workspaces=admin_of)
        return _form_page(request, server=None, form=form, cred_form=_cred_form(None, auth_type))
    form = ServerForm(request.POST, workspaces=admin_of)
    cred_form = _cred_form(None, request.POST.get("auth_type") or AuthType.NONE, request.POST, request.FILES,
                           owner=request.user)
    if _all_valid(form, cred_form):
        try:
            server = services.server_create(
                workspace=form.chosen_workspace(), actor=request.user, auth_type=form.cleaned_data["auth_type"],
                credential_mode=form.cleaned_data["credential_mode"] or CredentialMode.SHARED,
                credentials=None if form.members_enter_secrets else cred_form.payload(new=True),
                credentials_expires_at=cred_form.expires_at_value(), **form.service_fields(),
            )
        except ValidationError as exc:
            apply_service_errors(exc, form, cred_form)
        except LimitReached as exc:
            form.add_error(None, str(exc))
        else:
            if server.connects:  # nothing to test before an account is connected
                messages.success(request, f"Server {server.name} added. Connect "
                                 f"{'your own' if server.per_user else 'its'} account below to discover its tools.")
                return redirect(reverse("external_mcp-ui-server", args=[server.pk]) + "#connection")
            messages.success(request, f"Server {server.name} added. Test the connection to discover its tools.")
            return redirect(reverse("external_mcp-ui-server-edit", args=[server.pk]) + "#tests")
    return _form_page(request, server=None, form=form, cred_form=cred_form, status=400)


@login_required
@require_http_methods(["GET", "POST"])
def server_edit(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    if request.method == "GET":
        auth_type = request.GET.get("auth_type") or server.auth_type
        form = ServerForm(initial={"name": server.name, "prefix": server.prefix, "base_url": server.base_url,
                                   "transport": server.transport,
                                   "description": server.description, "tags": ", ".join(server.tags),
                                   "auth_type": auth_type, "credential_mode": server.credential_mode})
        return _form_page(request, server=server, form=form, cred_form=_cred_form(server, auth_type))
    form = ServerForm(request.POST)
    auth_type = request.POST.get("auth_type") or server.auth_type
    cred_form = _cred_form(server, auth_type, request.POST, request.FILES, owner=request.user)
    if _all_valid(form, cred_form):
        fields = form.service_fields()
        if fields["base_url"] == server.base_url:
            del fields["base_url"]  # unchanged: no new policy check (and DNS lookup) needed
        mode = form.cleaned_data["credential_mode"] or server.credential_mode
        new_auth = auth_type != server.auth_type or mode != server.credential_mode
        moving = "base_url" in fields and services.server_moves(server=server, base_url=fields["base_url"])
        payload = None if form.members_enter_secrets else cred_form.payload(new=new_auth)
        expires_at = cred_form.expires_at_value()
        try:
            with transaction.atomic():
                if new_auth or moving:
                    # A move with nothing typed gets the service's "enter the secret again" message.
                    credentials = (cred_form.payload(new=True) if not form.members_enter_secrets
                                   and (new_auth or payload is not None) else None)
                    services.server_update(server=server, actor=request.user, auth_type=auth_type,
                                           credential_mode=mode, credentials=credentials,
                                           credentials_expires_at=expires_at, **fields)
                else:
                    services.server_update(server=server, actor=request.user, **fields)
                    if payload is not None:
                        services.credentials_rotate(server=server, actor=request.user, credentials=payload,
                                                    expires_at=expires_at)
        except ValidationError as exc:
            apply_service_errors(exc, form, cred_form)
        else:
            messages.success(request, f"Server {fields.get('name', server.name)} saved.")
            return redirect("external_mcp-ui-server", server_id=server.pk)
    return _form_page(request, server=server, form=form, cred_form=cred_form, status=400)


# -- actions ---------------------------------------------------------------------------------------


def _test_context(request: HttpRequest, server: ExternalMcpServer) -> dict[str, Any]:
    try:
        result, _ = health.check_now(server)
    except Exception:  # noqa: BLE001 - a test that cannot run is a result to show, not a 500
        logger.exception("connection test of %s could not run", server.pk)
        return {"test": {"ok": False, "label": "The test could not run", "message": "An internal error stopped "
                         "the test; the logs have the details.", "hint": ""}}
    return {"test": check_summary(result)}


def check_summary(result: Any) -> dict[str, Any]:
    """What the result panel shows of a check, of a saved server or of unsaved settings alike."""
    return {
        "ok": result.ok, "label": ERROR_LABELS.get(result.error_class, "Failed") if not result.ok else "Connected",
        "error_class": result.error_class, "message": result.error_message, "hint": result.hint,
        "protocol_version": result.protocol_version, "era": result.era, "server_name": result.server_name,
        "transport": Transport(result.transport).label if result.transport else "",
        "server_version": result.server_version, "latency_ms": round(result.total_ms),
        "timings": {k: round(v) for k, v in result.timings_ms.items()}, "discovered": len(result.tools),
    }


@login_required
@require_POST
def server_test(request: HttpRequest, server_id: Any) -> HttpResponse:
    """Run one check now. htmx: the result (and tools to approve); otherwise a message."""
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    context = _test_context(request, server)
    test = context["test"]
    if not _partial(request):
        if test["ok"]:
            messages.success(request, f"{server.name}: connected in {test['latency_ms']} ms, "
                                      f"protocol {test['protocol_version']}, {test['discovered']} tool(s).")
        else:
            messages.error(request, f"{server.name}: {test['label']}. {test['message']} {test['hint']}".strip())
        return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-server", args=[server.pk])))
    server = _get_server(request, server_id)
    context.update(_tools_context(request, server, server_badge=server_badge(server),
                                  on_detail=request.POST.get("from") == "detail"))
    return _render(request, "external_mcp/_test_result.html", context)


@login_required
@require_POST
def server_tools_approve(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    names = request.POST.getlist("names")
    select_all = request.POST.get("all") == "1"
    error = approved = None
    try:
        approved = catalog.tools_approve(server=server, actor=request.user, names=names or None,
                                         select_all=select_all)
    except ValidationError as exc:
        error = " ".join(exc.messages)  # a field-keyed error's messages, flattened
        if error.startswith("Give tool names"):
            error = "Select at least one tool to approve."
    if not _partial(request):
        if error:
            messages.error(request, error)
        else:
            messages.success(request, f"Approved {len(approved or [])} tool(s): {', '.join(approved or [])}.")
        return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-server", args=[server.pk])
                                              + "#tools"))
    context = _tools_context(request, server, tools_error=error, approved=approved)
    return _render(request, "external_mcp/_tools.html", context)


@login_required
@require_POST
def server_toggle(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    services.server_update(server=server, actor=request.user, enabled=not server.enabled)
    messages.success(request, f"{server.name} {'disabled' if server.enabled else 'enabled'}.")
    return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-server", args=[server.pk])))


@login_required
@require_http_methods(["GET", "POST"])
def server_delete(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    if request.method == "POST":
        name = server.name
        services.server_delete(server=server, actor=request.user)
        messages.success(request, f"Server {name} deleted.")
        return redirect("external_mcp-ui-servers")
    return render(request, "external_mcp/server_confirm_delete.html",
                  {"server": server, "tool_count": server.tools.exclude(state=ToolState.REMOVED).count()})


@login_required
@require_POST
def server_rotate(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    if server.auth_type == AuthType.NONE:
        messages.error(request, "This server uses no credentials; choose an authentication type in Edit first.")
        return redirect("external_mcp-ui-server", server_id=server.pk)
    cred_form = _cred_form(server, server.auth_type, request.POST, request.FILES)
    if cred_form.is_valid():
        payload = cred_form.payload()
        if payload is None:
            cred_form.add_error(None, "Enter the new secret.")
        else:
            try:
                services.credentials_rotate(server=server, actor=request.user, credentials=payload,
                                            expires_at=cred_form.expires_at_value())
            except ValidationError as exc:
                apply_service_errors(exc, cred_form)
            else:
                messages.success(request, f"Credentials of {server.name} rotated. A check is queued.")
                return HttpResponseRedirect(reverse("external_mcp-ui-server", args=[server.pk]) + "#credentials")
    return _detail_page(request, server, rotate_form=cred_form, status=400)


# -- detail ----------------------------------------------------------------------------------------


def _detail_page(request: HttpRequest, server: ExternalMcpServer, *, rotate_form: CredentialsForm | None = None,
                 own_form: CredentialsForm | None = None, status: int = 200) -> HttpResponse:
    can_admin = _is_admin(request, server.workspace_id)
    stale = staleness.is_stale(server)
    version = server_live.live_version(server)
    context: dict[str, Any] = {
        "server": server, "server_badge": server_badge(server), "can_admin": can_admin,
        "poll_ms": poll_ms(), "live_version": version,
        "stale": {"since": staleness.stale_since(server), "recorded": badge(server.status)} if stale else None,
    }
    if _partial(request):
        # The visible tab's poll: the summary always, the cards and the bell out of band, the cards
        # only when something was recorded since the version the page holds.
        if request.GET.get("v") != version:
            context.update(server_live.live_cards(server, badge=badge), cards=True)
        return _render(request, "external_mcp/_server_live.html", context)
    context.update({
        **server_live.live_cards(server, badge=badge),
        "rotate_form": rotate_form or (_cred_form(server, server.auth_type)
                                       if can_admin and not (server.per_user and server.auth_type != AuthType.OAUTH2)
                                       else None),
        **_tools_context(request, server),
        **_credential_context(server),
        **_connect_context(request, server),
        "connection": connections.panel(server=server, viewer=request.user, can_admin=can_admin),
        "own_form": own_form or own_credentials_form(server),
    })
    return _render(request, "external_mcp/server_detail.html", context, status=status)


def connect_context(request: HttpRequest, *, name: str, path: str) -> dict[str, Any]:
    """What the "Connect an agent" section (``_connect.html``) shows for the endpoint at ``path``;
    ``name`` is the plain identifier the configurations file it under."""
    url = request.build_absolute_uri(path)
    return {"endpoint_url": url, "agent_configs": agent_configs(name=name, url=url)}


def _connect_context(request: HttpRequest, server: ExternalMcpServer) -> dict[str, Any]:
    return connect_context(request, name=server.prefix, path=reverse("external_mcp-proxy", args=[server.pk]))


@login_required
@require_http_methods(["GET"])
def server_detail(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    return _detail_page(request, _get_server(request, server_id))
