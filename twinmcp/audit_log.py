"""Reading the audit log: the filters of its page and the events they select.

Only workspaces the reader administers are ever read; every filter narrows within them. Periods are
whole UTC days: ``to`` includes its whole day.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django import forms
from django.db.models import QuerySet

from external_mcp.choices import AuditAction
from external_mcp.models import AuditEvent, ExternalMcpServer
from twinmcp.models import Membership, Workspace


class AuditFilterForm(forms.Form):
    workspace = forms.ChoiceField(label="Workspace", required=False)
    actor = forms.CharField(label="Actor (username)", required=False, max_length=150,
                            widget=forms.TextInput(attrs={"list": "known-actors", "autocomplete": "off",
                                                          "spellcheck": "false", "autocapitalize": "off"}))
    action = forms.ChoiceField(label="Action", required=False, choices=[("", "Any action"), *AuditAction.choices])
    server = forms.ChoiceField(label="Server", required=False)
    start = forms.DateField(label="From (UTC)", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To (UTC, included)", required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args: Any, workspaces: list[Workspace], servers: list[ExternalMcpServer],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["workspace"].choices = [("", "All my workspaces"), *((str(w.pk), w.name) for w in workspaces)]
        several = len(workspaces) > 1
        self.fields["server"].choices = [("", "Any server"), *(
            (str(s.pk), f"{s.name} ({s.workspace.name})" if several else s.name) for s in servers)]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("start") and data.get("end") and data["start"] > data["end"]:
            self.add_error("end", "Must be on or after the start date.")
        return data


def admin_workspaces(user: object) -> list[Workspace]:
    ids = Membership.objects.of_user(user).admins().values("workspace_id")
    return list(Workspace.objects.filter(pk__in=ids).order_by("name"))


def events(workspaces: list[Workspace], filters: dict[str, Any]) -> QuerySet[AuditEvent]:
    """The events of ``workspaces`` that ``filters`` (an ``AuditFilterForm``'s cleaned data) select,
    newest first, with what the page shows of them loaded in the same query."""
    qs = (AuditEvent.objects.filter(workspace_id__in=[w.pk for w in workspaces])
          .select_related("actor", "workspace", "server").order_by("-at", "-id"))
    if filters.get("workspace"):
        qs = qs.filter(workspace_id=filters["workspace"])
    if filters.get("actor"):
        qs = qs.filter(actor__username=filters["actor"])
    if filters.get("action"):
        qs = qs.filter(action=filters["action"])
    if filters.get("server"):
        qs = qs.filter(server_id=filters["server"])
    if filters.get("start"):
        qs = qs.filter(at__gte=datetime.combine(filters["start"], time.min, tzinfo=UTC))
    if filters.get("end"):
        qs = qs.filter(at__lt=datetime.combine(filters["end"] + timedelta(days=1), time.min, tzinfo=UTC))
    return qs


def changes_text(changes: Any) -> str:
    """The ``changes`` JSON laid out for reading (templates escape it)."""
    if not changes:
        return ""
    return json.dumps(changes, indent=2, sort_keys=True, ensure_ascii=False, default=str)
