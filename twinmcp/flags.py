"""The ``external_mcp_connect`` feature flag: waffle's rules plus per-workspace roll-out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest
from rest_framework import exceptions, permissions
from waffle import get_waffle_flag_model
from waffle.models import Flag

from twinmcp import invalidation
from twinmcp.models import FlagWorkspace, Membership, Workspace
from twinmcp.scoping import key_workspace_ids


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
    return FlagWorkspace.objects.filter(flag_id=flag.pk, workspace_id__in=workspace_ids).exists()


def flag_enable_for_workspace(*, workspace: Workspace, name: str | None = None) -> None:
    flag, _ = Flag.objects.get_or_create(name=name or settings.EXTERNAL_MCP_FLAG)
    _, created = FlagWorkspace.objects.get_or_create(flag=flag, workspace=workspace)
    if created:
        invalidation.announce_change()


class ExternalMcpEnabled(permissions.BasePermission):
    """404 (not 403) when the flag is off: the feature does not exist for this caller."""

    def has_permission(self, request: Any, view: Any) -> bool:
        if not external_mcp_enabled(request, key_workspace_ids(request)):
            raise exceptions.NotFound()
        return True


def require_external_mcp(request: HttpRequest) -> None:
    if not external_mcp_enabled(request):
        raise Http404("Not found")
