"""The API keys page: create a TwinMCP key (shown once, with a ready-to-paste MCP client
configuration for the workspace endpoint), list the caller's keys, revoke one after a confirmation.
Writes go through ``twinmcp.services``.

Creation is POST-redirect-GET, so a reload never makes a second key: the raw key crosses the
redirect encrypted in the session (``twinmcp.show_once``) and the first GET pops it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from external_mcp.models import ExternalMcpServer, Toolset
from external_mcp.toolsets import WORKSPACE_ENDPOINT_PATH, endpoint_path
from twinmcp import services, show_once
from twinmcp.flags import external_mcp_enabled
from twinmcp.models import ApiKey, Membership, Workspace


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(label="Key name", max_length=100, initial="default",
                           help_text="Where the key will be used, e.g. “laptop” or “ci-agent”.")
    workspace = forms.ChoiceField(label="Workspace")
    expires_on = forms.DateField(label="Expires on (optional)", required=False,
                                 widget=forms.DateInput(attrs={"type": "date"}),
                                 help_text="The key stops working at 00:00 UTC that day.")

    def __init__(self, *args: Any, workspaces: list[Workspace], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workspaces = {str(w.pk): w for w in workspaces}
        if len(workspaces) == 1:
            self.fields["workspace"].widget = forms.HiddenInput()
            self.fields["workspace"].initial = str(workspaces[0].pk)
        self.fields["workspace"].choices = [(str(w.pk), w.name) for w in workspaces]


def mcp_client_config(request: HttpRequest, workspace: Workspace, raw_key: str) -> dict[str, Any]:
    """The ``mcpServers`` block to paste, pointing at the workspace endpoint (every approved tool
    of the workspace, ``<prefix>__<tool>``), and the narrower endpoints beside it: each server's
    own and each toolset's."""
    servers: list[ExternalMcpServer] = []
    toolsets: list[Toolset] = []
    if external_mcp_enabled(request, [workspace.pk]):
        servers = list(ExternalMcpServer.objects.visible_to(request.user).filter(workspace=workspace)
                       .order_by("name"))
        toolsets = list(Toolset.objects.filter(workspace=workspace).order_by("name"))
    url = request.build_absolute_uri(WORKSPACE_ENDPOINT_PATH)
    entry = {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {raw_key}"}}
    return {
        "config": json.dumps({"mcpServers": {f"twinmcp-{workspace.slug}": entry}}, indent=2, ensure_ascii=False),
        "workspace_url": url,
        "server_count": len(servers),
        "servers": [(s.name, request.build_absolute_uri(reverse("external_mcp-proxy", args=[s.pk])))
                    for s in servers],
        "toolsets": [(t.name, request.build_absolute_uri(endpoint_path(t.pk))) for t in toolsets],
    }


NEW_KEY = "new-api-key"


def _created(request: HttpRequest) -> dict[str, Any] | None:
    """The key made by the POST this GET follows, with its raw value, or None."""
    stashed = show_once.pop(request, NEW_KEY)
    if stashed is None:
        return None
    key = ApiKey.objects.filter(pk=stashed.get("key_id"), user=request.user).select_related("workspace").first()
    if key is None or not key.is_active:
        return None
    raw = str(stashed.get("raw", ""))
    return {"key": key, "raw": raw, **mcp_client_config(request, key.workspace, raw)}


def _page(request: HttpRequest, form: ApiKeyCreateForm, *, created: dict | None = None,
          status: int = 200) -> HttpResponse:
    keys = ApiKey.objects.filter(user=request.user).select_related("workspace")
    response = render(request, "twinmcp/api_keys.html",
                      {"form": form, "keys": keys, "created": created,
                       "multi_workspace": len(form.workspaces) > 1,
                       "workspace_endpoint": request.build_absolute_uri(WORKSPACE_ENDPOINT_PATH)}, status=status)
    if created:
        response["Cache-Control"] = "no-store"  # the raw key is in this page: never cache it
    return response


@login_required
@require_http_methods(["GET", "POST"])
def api_keys(request: HttpRequest) -> HttpResponse:
    workspaces = [m.workspace for m in Membership.objects.filter(user=request.user).select_related("workspace")
                  .order_by("workspace__name")]
    if request.method == "GET":
        return _page(request, ApiKeyCreateForm(workspaces=workspaces), created=_created(request))
    form = ApiKeyCreateForm(request.POST, workspaces=workspaces)
    if not workspaces:
        form.add_error(None, "You are not a member of any workspace yet; ask an administrator to add you.")
    elif form.is_valid():
        workspace = form.workspaces[form.cleaned_data["workspace"]]
        day = form.cleaned_data.get("expires_on")
        try:
            key, raw = services.api_key_create(
                user=request.user, workspace=workspace, name=form.cleaned_data["name"],
                expires_at=datetime.combine(day, time.min, tzinfo=UTC) if day else None,
            )
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                target = "expires_on" if field == "expires_at" else field
                form.add_error(target if target in form.fields else None, errors)
        else:
            show_once.stash(request, NEW_KEY, {"key_id": str(key.pk), "raw": raw})
            return redirect("twinmcp-ui-api-keys")
    return _page(request, form, status=400)


@login_required
@require_http_methods(["GET", "POST"])
def api_key_revoke(request: HttpRequest, key_id: Any) -> HttpResponse:
    """GET asks for confirmation (a page, so it works without JavaScript); POST revokes."""
    key = ApiKey.objects.filter(pk=key_id, user=request.user).select_related("workspace").first()
    if key is None:
        raise Http404("No such key.")
    if request.method == "GET":
        if not key.is_active:
            return redirect("twinmcp-ui-api-keys")
        return render(request, "twinmcp/api_key_confirm_revoke.html", {"key": key})
    services.api_key_revoke(key=key)
    messages.success(request, f"Key {key.name} ({key.prefix}…) revoked; agents using it are refused from now on.")
    return redirect("twinmcp-ui-api-keys")
