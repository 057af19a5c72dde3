"""A user's in-app notifications: what the bell counts and the list page shows, and marking them read.

Notifications are created by ``external_mcp.notifications`` (status changes, tool changes, alerts);
this module only reads them and records that their owner has seen them.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from external_mcp.models import Notification


def notifications_for(user: Any) -> QuerySet[Notification]:
    """The user's notifications, newest first, with the server for links."""
    return Notification.objects.filter(user=user).select_related("server").order_by("-created_at")


def unread_count(user: Any) -> int:
    return Notification.objects.filter(user=user, read_at__isnull=True).count()


def notification_mark_read(*, user: Any, notification_id: Any) -> Notification | None:
    """Mark one of the user's notifications read (idempotent). None when it is not theirs."""
    notification = Notification.objects.filter(user=user, pk=notification_id).first()
    if notification is None:
        return None
    if notification.read_at is None:
        now = timezone.now()
        Notification.objects.filter(pk=notification.pk, read_at__isnull=True).update(read_at=now)
        notification.read_at = now
    return notification


def notifications_mark_all_read(*, user: Any) -> int:
    """Mark every unread notification of the user read; returns how many changed."""
    return Notification.objects.filter(user=user, read_at__isnull=True).update(read_at=timezone.now())
