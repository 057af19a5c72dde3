"""Celery tasks: take ids, call services."""

from __future__ import annotations

from celery import shared_task

from external_mcp import health, notifications
from external_mcp.models import ExternalMcpServer
from external_mcp.oauth import revocation


@shared_task(ignore_result=True)
def health_sweep() -> int:
    return health.sweep()


@shared_task(ignore_result=True)
def check_server(server_id: str) -> None:
    server = ExternalMcpServer.objects.select_related("credential").filter(pk=server_id, enabled=True).first()
    if server is not None:
        health.check_now(server)


@shared_task(ignore_result=True)
def send_notification_emails(notification_ids: list[str]) -> int:
    return notifications.send_emails(notification_ids=notification_ids)


@shared_task(ignore_result=True)
def email_sweep() -> int:
    return notifications.email_sweep()


@shared_task(ignore_result=True)
def send_revocations(revocation_ids: list[str] | None = None) -> int:
    """The ones just queued, or (from beat) every one that is due again."""
    return revocation.revocations_send(ids=revocation_ids)
