"""The notification inbox and the bell in the top bar, which a visible tab refreshes by itself
(the server page refreshes it with its own poll instead)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from external_mcp import inbox
from external_mcp.views import _next_url, _partial, _render
from twinmcp.context_processors import require_external_mcp_page


@login_required
@require_http_methods(["GET"])
def bell(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    return render(request, "_bell.html")


@login_required
@require_http_methods(["GET"])
def notifications(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    unread_only = request.GET.get("unread") == "1"
    rows = inbox.notifications_for(request.user)
    if unread_only:
        rows = rows.filter(read_at__isnull=True)
    page = Paginator(rows, 50).get_page(request.GET.get("page"))
    context = {"page": page, "notifications": page.object_list, "unread_only": unread_only,
               "email_max_attempts": settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS}
    return _render(request, "external_mcp/notifications.html", context, partial="notification-list")


@login_required
@require_POST
def notification_read(request: HttpRequest, notification_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    notification = inbox.notification_mark_read(user=request.user, notification_id=notification_id)
    if notification is None:
        raise Http404("No such notification.")
    if _partial(request):
        return _render(request, "external_mcp/notifications.html",
                       {"n": notification, "oob_bell": True,
                        "email_max_attempts": settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS},
                       partial="notification-item")
    return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-notifications")))


@login_required
@require_POST
def notifications_read_all(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    count = inbox.notifications_mark_all_read(user=request.user)
    messages.success(request, f"{count} notification(s) marked as read." if count else "Nothing was unread.")
    return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-notifications")))
