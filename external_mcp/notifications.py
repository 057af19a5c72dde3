"""In-app notifications and e-mails to workspace admins, each transition notified once."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from external_mcp.choices import NotificationKind
from external_mcp.models import ExternalMcpServer, HealthCheck, Notification
from twinmcp.models import Membership, Role, Workspace

logger = logging.getLogger(__name__)

ALERT_WINDOW = timedelta(minutes=5)
ALERT_COOLDOWN = timedelta(minutes=30)
ALERT_MIN_CHECKS = 3


def notify_admins(
    *, workspace_id: object, kind: str, title: str, body: str, dedup_key: str,
    server: ExternalMcpServer | None = None,
) -> list[Notification]:
    """Create one notification per admin (a repeated ``dedup_key`` creates nothing) and
    queue their e-mails after the transaction commits."""
    admin_ids = list(
        Membership.objects.filter(workspace_id=workspace_id, role=Role.ADMIN).values_list("user_id", flat=True)
    )
    rows = [
        Notification(user_id=user_id, workspace_id=workspace_id, server=server, kind=kind, title=title[:200],
                     body=body, dedup_key=dedup_key[:200])
        for user_id in admin_ids
    ]
    Notification.objects.bulk_create(rows, ignore_conflicts=True)
    created = list(Notification.objects.filter(dedup_key=dedup_key[:200], user_id__in=admin_ids,
                                                email_sent_at__isnull=True))
    if created:
        ids = [str(n.pk) for n in created]
        transaction.on_commit(lambda: _queue_emails(ids))
    return created


def _queue_emails(ids: list[str]) -> None:
    from external_mcp.tasks import send_notification_emails

    send_notification_emails.delay(ids)


def send_emails(*, notification_ids: list[str]) -> int:
    """Send each notification's e-mail at most once (claimed by a guarded update)."""
    sent = 0
    user_model = get_user_model()
    for notification in Notification.objects.filter(pk__in=notification_ids, email_sent_at__isnull=True):
        claimed = Notification.objects.filter(pk=notification.pk, email_sent_at__isnull=True).update(
            email_sent_at=timezone.now()
        )
        if not claimed:
            continue
        email = user_model.objects.filter(pk=notification.user_id).values_list("email", flat=True).first()
        if not email:
            continue
        try:
            send_mail(f"[TwinMCP] {notification.title}", notification.body, settings.DEFAULT_FROM_EMAIL, [email])
            sent += 1
        except Exception:  # noqa: BLE001 - a mail outage must not break health checks
            logger.exception("could not send notification e-mail %s", notification.pk)
    return sent


def failure_ratio_alert(*, workspace_id: object) -> bool:
    """Raise one alert when more than 30% of the workspace's checks failed in 5 minutes."""
    since = timezone.now() - ALERT_WINDOW
    checks = HealthCheck.objects.filter(server__workspace_id=workspace_id, checked_at__gte=since)
    total = checks.count()
    failed = checks.filter(ok=False).count()
    if total < ALERT_MIN_CHECKS or failed / total <= 0.3:
        return False
    recent = Notification.objects.filter(
        workspace_id=workspace_id, kind=NotificationKind.ALERT, created_at__gte=timezone.now() - ALERT_COOLDOWN
    )
    if recent.exists():
        return False
    workspace = Workspace.objects.get(pk=workspace_id)
    bucket = int(timezone.now().timestamp() // ALERT_COOLDOWN.total_seconds())
    notify_admins(
        workspace_id=workspace_id, kind=NotificationKind.ALERT,
        title=f"{failed} of {total} health checks failed in {workspace.name} over 5 minutes",
        body="More than 30% of the health checks of this workspace's MCP servers failed in the last 5 minutes.",
        dedup_key=f"alert:{workspace_id}:{bucket}",
    )
    return True
