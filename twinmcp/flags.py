"""The ``external_mcp_connect`` feature flag: waffle's rules plus per-workspace roll-out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest
from rest_framework import exceptions, permissions
from waffle import get_waffle_flag_model

from twinmcp.models import Membership


def external_mcp_enabled(request: HttpRequest | Any, workspace_ids: Iterable[Any] | None = None) -> bool:
    flag = get_waffle_flag_model().get(settings.EXTERNAL_MCP_FLAG)
    if flag.pk is None or flag.everyone is False:
        return False
    if flag.is_active(request):
        return True
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return False
    if workspace_ids is None:
        workspace_ids = Membership.objects.filter(user=user).values("workspace_id")
    return flag.workspaces.filter(pk__in=workspace_ids).exists()


class ExternalMcpEnabled(permissions.BasePermission):
    """404 (not 403) when the flag is off: the feature does not exist for this caller."""

    def has_permission(self, request: Any, view: Any) -> bool:
        if not external_mcp_enabled(request):
            raise exceptions.NotFound()
        return True


def require_external_mcp(request: HttpRequest) -> None:
    if not external_mcp_enabled(request):
        raise Http404("Not found")
