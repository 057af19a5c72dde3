"""The quota page: where each member of a workspace stands against the daily quota today, and who
the quota refused over a period. Admins see their workspace's members; a member sees only
themself; a workspace the viewer does not belong to does not exist for them (404)."""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_http_methods

from twinmcp.models import Membership, Role
from usage.queries import range_start
from usage.quota import QuotaUnavailable, next_reset
from usage.quota_board import member_quotas
from usage.serializers import DEFAULT_RANGE_DAYS


class QuotaFilterForm(forms.Form):
    workspace = forms.ChoiceField(label="Workspace", required=False)
    start = forms.DateField(label="Refusals from (UTC day)", required=False,
                            widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To (UTC day)", required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args: Any, workspaces: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["workspace"].choices = workspaces
        if len(workspaces) < 2:
            self.fields["workspace"].widget = forms.HiddenInput()

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if start and end and start > end:
            self.add_error("end", "Must be on or after the start day.")
        elif start and end and (end - start).days + 1 > settings.USAGE_MAX_RANGE_DAYS:
            self.add_error("start", f"At most {settings.USAGE_MAX_RANGE_DAYS} days.")
        return data


def _period(data: dict[str, Any], today: date) -> tuple[date, date]:
    end = data.get("end") or today
    return data.get("start") or range_start(end, DEFAULT_RANGE_DAYS), end


@login_required
@require_http_methods(["GET"])
def quota_page(request: HttpRequest) -> HttpResponse:
    memberships = list(Membership.objects.filter(user=request.user).select_related("workspace")
                       .order_by("workspace__name"))
    # Admin workspaces first: the page is mostly for them.
    memberships.sort(key=lambda m: m.role != Role.ADMIN)
    asked = request.GET.get("workspace")
    if asked and asked not in {str(m.workspace_id) for m in memberships}:
        raise Http404("No such workspace.")
    now = timezone.now()
    default_start, default_end = _period({}, now.date())
    form = QuotaFilterForm(request.GET or None, initial={"start": default_start, "end": default_end},
                           workspaces=[(str(m.workspace_id), m.workspace.name) for m in memberships])
    data = form.cleaned_data if form.is_valid() else {}
    start, end = _period(data, now.date())
    context: dict[str, Any] = {"form": form, "start": start, "end": end, "rows": [], "membership": None,
                               "unavailable": False}
    if memberships:
        membership = next((m for m in memberships if str(m.workspace_id) == asked), memberships[0])
        is_admin = membership.role == Role.ADMIN
        try:
            rows = member_quotas(workspace_id=membership.workspace_id, viewer_id=request.user.pk,
                                 viewer_is_admin=is_admin, start=start, end=end, now=now)
        except QuotaUnavailable:
            rows, context["unavailable"] = [], True
        usage_url = reverse("usage-ui-dashboard")
        entries = []
        for row in rows:
            params = {"start": start.isoformat(), "end": end.isoformat(), "group_by": "tool"}
            if is_admin:
                params["user"] = str(row.user_id)
            entries.append({"quota": row, "usage_url": f"{usage_url}?{urlencode(params)}"})
        context.update(membership=membership, is_admin=is_admin, rows=entries,
                       reset_at=next_reset(now), refusals_total=sum(r.refusals for r in rows))
    partial = bool(request.htmx) and not request.htmx.history_restore_request
    template = "usage/quota.html#quota-table" if partial else "usage/quota.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response
