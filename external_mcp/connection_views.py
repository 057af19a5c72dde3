"""Pages that connect accounts to a server: Connect (OAuth: off to the authorization server, then
back through ``/oauth/callback``), a member's own secret for per-user credentials, and
Disconnect. Thin: the rules are in ``external_mcp.connections`` and ``external_mcp.oauth.flow``."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from external_mcp import connections
from external_mcp.choices import AuthType
from external_mcp.forms import apply_service_errors, own_credentials_form
from external_mcp.models import Connection, ExternalMcpServer
from external_mcp.oauth import flow
from external_mcp.views import _detail_page, _get_server, _is_admin
from twinmcp.context_processors import require_external_mcp_page

SECTION = "#connection"


def _back(server: ExternalMcpServer) -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("external_mcp-ui-server", args=[server.pk]) + SECTION)


@login_required
@require_POST
def server_connect(request: HttpRequest, server_id: Any) -> HttpResponse:
    """Off to the authorization server: the admin (or the member, per-user) signs in there.

    Not a 302 answering the form: the pages' CSP (``form-action 'self'``) applies to a form's
    redirects, so a browser would stay here. htmx navigates itself (``HX-Redirect``); without
    script, a page names where the browser goes and links there."""
    require_external_mcp_page(request)
    server = _get_server(request, server_id)
    try:
        url = flow.authorization_start(server=server, user=request.user)
    except flow.AuthorizationFailed as exc:
        messages.error(request, str(exc))
        if request.htmx:
            return HttpResponseClientRedirect(reverse("external_mcp-ui-server", args=[server.pk]) + SECTION)
        return _back(server)
    if request.htmx:
        return HttpResponseClientRedirect(url)
    parts = urlsplit(url)
    return render(request, "external_mcp/oauth_continue.html",
                  {"server": server, "url": url, "origin": f"{parts.scheme}://{parts.netloc}"})


@login_required
@require_GET
def oauth_callback(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    try:
        done = flow.authorization_finish(user=request.user, params=request.GET.dict())
    except flow.AuthorizationFailed as exc:
        if exc.server is None:
            return render(request, "external_mcp/oauth_failed.html", {"message": str(exc)}, status=400)
        messages.error(request, str(exc))
        return _back(exc.server)
    whose = "Your account is" if done.connection.user_id else "The workspace's account is"
    messages.success(request, f"{whose} connected to {done.server.name}. A check is queued.")
    return _back(done.server)


@login_required
@require_POST
def server_own_secret(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id)
    form = own_credentials_form(server, request.POST, request.FILES)
    if form is None:
        raise Http404("This server takes no secret per member.")
    if form.is_valid():
        try:
            connections.connection_save_secret(server=server, user=request.user, credentials=form.payload(new=True))
        except ValidationError as exc:
            apply_service_errors(exc, form)
        else:
            messages.success(request, f"Your credentials for {server.name} are saved; your calls now use them.")
            return _back(server)
    return _detail_page(request, server, own_form=form, status=400)


@login_required
@require_POST
def server_disconnect(request: HttpRequest, server_id: Any) -> HttpResponse:
    """The caller's own connection, or (admins) the workspace's or a member's (``connection``)."""
    require_external_mcp_page(request)
    server = _get_server(request, server_id)
    target = request.POST.get("connection")
    rows = server.connections.all()
    if target:
        if not _is_admin(request, server.workspace_id):
            raise PermissionDenied("Only admins can disconnect someone else's account.")
        row = rows.filter(pk=target).first() if _is_uuid(target) else None
    else:
        if not server.per_user and not _is_admin(request, server.workspace_id):
            raise PermissionDenied("Only admins can disconnect the workspace's account.")
        row = Connection.objects.used_by(server, request.user.pk).first()
    if row is None:
        raise Http404("No such connection.")
    connections.connection_delete(connection=row, actor=request.user)
    messages.success(request, f"Disconnected from {server.name}"
                     + (" (its tokens are being revoked)." if server.auth_type == AuthType.OAUTH2 else "."))
    return _back(server)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
