"""The audit log page: who changed what in the workspaces the caller administers.

Admins only (members get a 403, like the other admin actions; an admin of one workspace never sees
another's events). Filters live in the URL, so a filtered view can be bookmarked or linked to (the
server page links its own history). One view serves the page and, for htmx, the table alone.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models.functions import Lower
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_GET

from external_mcp.models import ExternalMcpServer
from twinmcp import audit_log
from twinmcp.models import Membership

PAGE_SIZE = 50


@login_required
@require_GET
def audit_list(request: HttpRequest) -> HttpResponse:
    workspaces = audit_log.admin_workspaces(request.user)
    if not workspaces:
        raise PermissionDenied("Only workspace admins can read the audit log.")
    servers = list(ExternalMcpServer.objects.filter(workspace__in=workspaces).select_related("workspace")
                   .order_by(Lower("name"), "id"))
    filters = audit_log.AuditFilterForm(request.GET or None, workspaces=workspaces, servers=servers)
    valid = filters.is_valid() if filters.is_bound else True
    qs = audit_log.events(workspaces, filters.cleaned_data if filters.is_bound and valid else {})
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    for event in page.object_list:
        event.changes_text = audit_log.changes_text(event.changes)
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "filters": filters,
        "page": page,
        "events": page.object_list,
        "query": query.urlencode(),
        "filtered": any(v for k, v in request.GET.items() if k != "page"),
        "multi_workspace": len(workspaces) > 1,
        "known_actors": sorted(set(Membership.objects.filter(workspace__in=workspaces)
                                   .values_list("user__username", flat=True))),
    }
    partial = bool(request.htmx) and not request.htmx.history_restore_request
    template = "twinmcp/audit_log.html#audit-table" if partial else "twinmcp/audit_log.html"
    # htmx swaps no 4xx answer, so a partial with invalid filters says so in a 200.
    response = render(request, template, context, status=400 if not valid and not partial else 200)
    patch_vary_headers(response, ("HX-Request",))
    return response
