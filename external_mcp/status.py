"""Status transitions: a guarded ``UPDATE … WHERE status = old``, so when two workers race
only one records the change and notifies (healthchecks.io's pattern)."""

from __future__ import annotations

from django.db import transaction

from external_mcp.choices import NotificationKind, ServerStatus
from external_mcp.models import ExternalMcpServer, StatusChange
from external_mcp.notifications import notify_admins


def transition(*, server: ExternalMcpServer, new: str, reason: str) -> StatusChange | None:
    """Move ``server`` to ``new`` if nobody else did; record and notify only on success."""
    old = server.status
    if old == new or (old == ServerStatus.DISABLED and new != ServerStatus.NEW):
        return None
    with transaction.atomic():
        if not ExternalMcpServer.objects.filter(pk=server.pk, status=old).update(status=new):
            return None
        change = StatusChange.objects.create(server=server, old=old, new=new, reason=reason[:2000])
        server.status = new
        _notify_transition(server, change)
    return change


def _notify_transition(server: ExternalMcpServer, change: StatusChange) -> None:
    if change.new == ServerStatus.WARNING:
        kind, title = NotificationKind.WARNING, f"{server.name} has a problem"
    elif change.new == ServerStatus.DOWN:
        kind, title = NotificationKind.DOWN, f"{server.name} is down"
    elif change.new == ServerStatus.HEALTHY and change.old in (ServerStatus.WARNING, ServerStatus.DOWN):
        kind, title = NotificationKind.RECOVERED, f"{server.name} recovered"
    else:
        return
    notify_admins(workspace_id=server.workspace_id, server=server, kind=kind, title=title,
                  body=change.reason or title, dedup_key=f"{kind}:{server.pk}:{change.pk}")
