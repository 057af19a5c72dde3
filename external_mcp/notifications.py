"""In-app notifications and e-mails to workspace admins, each transition notified once.

E-mails are delivered at least once and recorded as sent at most once. A send is a claim (one
guarded UPDATE that counts the attempt and pushes ``email_next_attempt_at`` past a lease), the
SMTP conversation, then the outcome: sent (``email_sent_at``, never sent again), or failed (the
error kept in ``email_last_error``, due again after an exponential backoff: 1 min, 2, 4 … at most
1 h), up to ``EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS``. The task queued at commit is only the fast path:
beat's ``email_sweep`` sends whatever is due, including the e-mail of a worker that died holding
a claim, once its lease (``EXTERNAL_MCP_EMAIL_LEASE_SECONDS``) is over. A lease far longer than
``EMAIL_TIMEOUT`` keeps a slow send from being claimed twice.
"""

from __future__ import annotations

import logging
import smtplib
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from external_mcp.choices import NotificationKind
from external_mcp.models import ExternalMcpServer, HealthCheck, Notification
from external_mcp.queue import queue_emails
from external_mcp.storable import display_text
from twinmcp.models import Membership, Role, Workspace

logger = logging.getLogger(__name__)

ALERT_WINDOW = timedelta(minutes=5)
ALERT_COOLDOWN = timedelta(minutes=30)
ALERT_MIN_CHECKS = 3
BACKOFF_FIRST = timedelta(minutes=1)
BACKOFF_MAX = timedelta(hours=1)
SWEEP_BATCH = 200


def notify_admins(
    *, workspace_id: object, kind: str, title: str, body: str, dedup_key: str,
    server: ExternalMcpServer | None = None,
) -> list[Notification]:
    """Create one notification per admin (a repeated ``dedup_key`` creates nothing) and
    queue their e-mails after the transaction commits."""
    admin_ids = list(
        Membership.objects.filter(workspace_id=workspace_id, role=Role.ADMIN).values_list("user_id", flat=True)
    )
    return notify_users(user_ids=admin_ids, workspace_id=workspace_id, kind=kind, title=title, body=body,
                        dedup_key=dedup_key, server=server)


def notify_users(
    *, user_ids: list[int], workspace_id: object, kind: str, title: str, body: str, dedup_key: str,
    server: ExternalMcpServer | None = None,
) -> list[Notification]:
    now = timezone.now()
    rows = [
        Notification(user_id=user_id, workspace_id=workspace_id, server=server, kind=kind, title=title[:200],
                     body=body, dedup_key=dedup_key[:200], email_next_attempt_at=now)
        for user_id in user_ids
    ]
    Notification.objects.bulk_create(rows, ignore_conflicts=True)
    created = list(Notification.objects.filter(dedup_key=dedup_key[:200], user_id__in=user_ids,
                                                email_sent_at__isnull=True))
    if created:
        ids = [str(n.pk) for n in created]
        transaction.on_commit(lambda: queue_emails(ids))
    return created


def backoff(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed send."""
    return min(BACKOFF_FIRST * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


def email_claim(*, notification_id: object, now: datetime | None = None) -> bool:
    """Take a due e-mail for this worker: count the attempt and make it due again only when the
    lease ends, so nobody else sends it meanwhile and it is not lost if this worker dies."""
    now = now or timezone.now()
    lease = timedelta(seconds=settings.EXTERNAL_MCP_EMAIL_LEASE_SECONDS)
    return bool(
        Notification.objects.email_due(now)
        .filter(pk=notification_id, email_attempts__lt=settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS)
        .update(email_attempts=F("email_attempts") + 1, email_next_attempt_at=now + lease,
                email_last_attempt_at=now)
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        message = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) \
            else str(exc.smtp_error)
        text = f"SMTP {exc.smtp_code}: {message}"
    elif isinstance(exc, smtplib.SMTPRecipientsRefused):
        text = f"SMTP refused the recipient: {exc.recipients}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return display_text(text, 1000)


def email_send(*, notification_id: object) -> bool:
    """Claim, send and record one notification's e-mail. True when this call sent it."""
    email = (get_user_model().objects.filter(notifications__pk=notification_id)
             .values_list("email", flat=True).first())
    if not email:
        Notification.objects.filter(pk=notification_id, email_sent_at__isnull=True).update(
            email_next_attempt_at=None, email_last_error="Not sent: the user has no e-mail address.")
        return False
    if not email_claim(notification_id=notification_id):
        return False
    notification = Notification.objects.get(pk=notification_id)
    try:
        send_mail(f"[TwinMCP] {notification.title}", notification.body, settings.DEFAULT_FROM_EMAIL, [email])
    except Exception as exc:  # noqa: BLE001 - a mail outage must not break the caller; the sweep retries
        error = _describe(exc)
        retry = notification.email_attempts < settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS
        next_at = timezone.now() + backoff(notification.email_attempts) if retry else None
        Notification.objects.filter(pk=notification_id, email_sent_at__isnull=True).update(
            email_last_error=error, email_next_attempt_at=next_at)
        logger.warning("notification e-mail %s failed (attempt %s): %s", notification_id,
                       notification.email_attempts, error)
        return False
    Notification.objects.filter(pk=notification_id, email_sent_at__isnull=True).update(
        email_sent_at=timezone.now(), email_next_attempt_at=None, email_last_error="")
    return True


def send_emails(*, notification_ids: list[str]) -> int:
    """Send the e-mails of these notifications that are due; returns how many were sent."""
    return sum(email_send(notification_id=notification_id) for notification_id in notification_ids)


def email_sweep(*, limit: int = SWEEP_BATCH) -> int:
    """Send every e-mail that is due (beat runs this every ``EXTERNAL_MCP_EMAIL_SWEEP_SECONDS``)."""
    now = timezone.now()
    max_attempts = settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS
    # A last attempt whose worker died: nothing more to try.
    Notification.objects.email_due(now).filter(email_attempts__gte=max_attempts).update(
        email_next_attempt_at=None,
        email_last_error=f"Gave up after {max_attempts} attempts; the last one did not finish (its worker stopped).")
    due = list(Notification.objects.email_due(now).order_by("email_next_attempt_at")
               .values_list("pk", flat=True)[:limit])
    return send_emails(notification_ids=due)


def failure_ratio_alert(*, workspace_id: object) -> bool:
    """Raise one alert when more than 30% of the workspace's checks failed in 5 minutes."""
    since = timezone.now() - ALERT_WINDOW
    checks = HealthCheck.objects.filter(server__workspace_id=workspace_id, checked_at__gte=since).exclude(
        error_class="needs_auth")  # nothing was sent: waiting for an account is no failure of the server
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
