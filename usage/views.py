"""The usage dashboard. The page renders the filters and the export links; the browser fetches the
figures from the usage API (``USAGE_API``, session-authenticated) and draws them (static/js/usage.js),
so the page and the API can never disagree. Members only ever see their own usage."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from external_mcp.models import ExternalMcpServer, ExternalMcpTool
from twinmcp.context_processors import require_external_mcp_page
from twinmcp.models import Membership, Role
from usage.outcomes import outcome_legend
from usage.queries import range_start
from usage.serializers import DEFAULT_RANGE_DAYS

USAGE_API = "/api/v1/external-mcp/usage"
USAGE_EXPORT_API = "/api/v1/external-mcp/usage/export"
PRESETS = (7, 30, 90)
GROUP_BY_CHOICES = [("tool", "Tool"), ("server", "Server"), ("user", "User")]


class UsageFilterForm(forms.Form):
    user = forms.TypedChoiceField(label="User", required=False, coerce=int, empty_value=None)
    server = forms.ChoiceField(label="Server", required=False)
    tool = forms.CharField(label="Tool", required=False, max_length=200,
                           widget=forms.TextInput(attrs={"list": "known-tools", "autocomplete": "off"}))
    start = forms.DateField(label="From (UTC day)", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To (UTC day)", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    group_by = forms.ChoiceField(label="Table grouped by", required=False, choices=GROUP_BY_CHOICES)

    def __init__(self, *args: Any, users: list | None, servers: list, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if users is None:
            del self.fields["user"]
            self.fields["group_by"].choices = [c for c in GROUP_BY_CHOICES if c[0] != "user"]
        else:
            self.fields["user"].choices = [("", "Everyone"), *[(u.pk, u.get_username()) for u in users]]
        self.fields["server"].choices = [("", "All servers"), *[(str(s.pk), s.label) for s in servers]]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if start and end and start > end:
            self.add_error("end", "Must be on or after the start day.")
        return data


def _period(data: dict[str, Any], today: date) -> tuple[date, date]:
    end = data.get("end") or today
    start = data.get("start") or range_start(end, DEFAULT_RANGE_DAYS)
    return start, end


@login_required
@require_http_methods(["GET"])
def dashboard(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    user = request.user
    admin_of = list(Membership.objects.filter(user=user, role=Role.ADMIN).values_list("workspace_id", flat=True))
    users = None
    if admin_of:
        users = list(get_user_model().objects.filter(memberships__workspace_id__in=admin_of).distinct()
                     .order_by("username"))
    servers = list(ExternalMcpServer.objects.visible_to(user).select_related("workspace").order_by("name"))
    multi = len({s.workspace_id for s in servers}) > 1
    for server in servers:
        server.label = f"{server.name} ({server.workspace.name})" if multi else server.name
    form = UsageFilterForm(request.GET or None, users=users, servers=servers)
    data: dict[str, Any] = {}
    if form.is_bound:
        # A link may carry one stale filter (a server deleted since): its field shows the error and
        # the other filters still apply.
        form.is_valid()
        data = form.cleaned_data
    today = timezone.now().date()
    start, end = _period(data, today)
    query: dict[str, Any] = {"start": start.isoformat(), "end": end.isoformat()}
    if users is None:
        query["user"] = user.pk  # members: their own usage, whatever the URL says
    elif data.get("user"):
        query["user"] = data["user"]
    if data.get("server"):
        query["server"] = data["server"]
    if data.get("tool"):
        query["tool"] = data["tool"]
    group_by = data.get("group_by") or ("server" if users is None else "tool")
    presets = []
    for days in PRESETS:
        params = {k: v for k, v in request.GET.items() if k not in ("start", "end")}
        params.update({"start": (today - timedelta(days=days - 1)).isoformat(), "end": today.isoformat()})
        presets.append({"days": days, "url": f"?{urlencode(params)}",
                        "current": start == today - timedelta(days=days - 1) and end == today})
    tools = (ExternalMcpTool.objects.filter(server__in=[s.pk for s in servers])
             .values_list("name", flat=True).distinct().order_by("name")[:500])
    context = {
        "form": form,
        "is_admin": users is not None,
        "start": start, "end": end,
        "group_by": group_by,
        "group_label": dict(GROUP_BY_CHOICES)[group_by],
        "api_url": USAGE_API,
        "api_query": urlencode(query),
        "export_csv": f"{USAGE_EXPORT_API}?{urlencode({'format': 'csv', **query})}",
        "export_json": f"{USAGE_EXPORT_API}?{urlencode({'format': 'json', **query})}",
        "presets": presets,
        "known_tools": list(tools),
        "outcomes": outcome_legend(),
        "filtered": any(data.get(name) for name in ("user", "server", "tool")),
    }
    return render(request, "usage/dashboard.html", context)
