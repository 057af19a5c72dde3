"""Notification e-mails against a real SMTP server on 127.0.0.1: a refused send is retried with
backoff and its last error shown, a claim whose worker died is sent after its lease, attempts are
capped, and a sent e-mail is never sent again."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from external_mcp import health, notifications, services
from external_mcp.mcp_client import CheckResult
from external_mcp.models import ExternalMcpServer, Notification
from tests.mcp_peers import reserve_port
from tests.smtp_peer import SmtpPeer

FAIL = CheckResult(ok=False, error_class="connect", error_message="Cannot connect.", total_ms=3)


@pytest.fixture
def smtp(settings):
    with SmtpPeer(refusing=True) as peer:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", peer.port, 5
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
        settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS = 4
        settings.EXTERNAL_MCP_EMAIL_LEASE_SECONDS = 300
        yield peer


@pytest.fixture
def t0():
    return timezone.now().replace(microsecond=0)


@pytest.fixture
def notification(admin, member, t0) -> Notification:
    """One notification for the admin (alice@example.com): the server went to warning."""
    admin.user.email = "alice@example.com"
    admin.user.save()
    with time_machine.travel(t0, tick=False):
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="mail-me",
                                        base_url="https://93.184.215.14/mcp")
        health.record_check(server=ExternalMcpServer.objects.get(pk=server.pk), result=FAIL)
    return Notification.objects.get()


def at(moment):
    return time_machine.travel(moment, tick=False)


def fresh(notification: Notification) -> Notification:
    return Notification.objects.get(pk=notification.pk)


def test_a_refused_email_is_retried_and_sent_once_the_server_accepts(smtp, notification, t0):
    ids = [str(notification.pk)]
    with at(t0):
        assert notifications.send_emails(notification_ids=ids) == 0
    smtp.refusing = False
    with at(t0 + timedelta(seconds=61)):
        assert notifications.send_emails(notification_ids=ids) == 1
    [mail] = smtp.messages
    assert mail.recipients == ["alice@example.com"] and b"mail-me has a problem" in mail.data
    sent = fresh(notification)
    assert sent.email_sent_at == t0 + timedelta(seconds=61) and sent.email_attempts == 2
    assert sent.email_next_attempt_at is None and sent.email_last_error == ""
    with at(t0 + timedelta(hours=2)):
        assert notifications.send_emails(notification_ids=ids) == 0
        assert notifications.email_sweep() == 0
    assert len(smtp.messages) == 1


def test_a_refused_email_records_its_error_and_waits_for_its_backoff(smtp, notification, t0):
    ids = [str(notification.pk)]
    with at(t0):
        assert notifications.send_emails(notification_ids=ids) == 0
    failed = fresh(notification)
    assert failed.email_sent_at is None and failed.email_attempts == 1
    assert "421" in failed.email_last_error and "Service not available" in failed.email_last_error
    assert failed.email_next_attempt_at == t0 + timedelta(seconds=60)
    smtp.refusing = False
    with at(t0 + timedelta(seconds=30)):
        assert notifications.send_emails(notification_ids=ids) == 0  # not due yet
    assert smtp.messages == [] and smtp.connections == 1


def test_the_sweep_waits_for_the_backoff_which_doubles_up_to_the_attempt_cap(smtp, notification, t0):
    with at(t0):
        assert notifications.email_sweep() == 0  # attempt 1: refused, next in 60 s
    due = t0 + timedelta(seconds=60)
    with at(due - timedelta(seconds=1)):
        assert notifications.email_sweep() == 0
    assert smtp.connections == 1
    for attempt, wait in [(2, 120), (3, 240)]:
        with at(due):
            notifications.email_sweep()
        assert fresh(notification).email_attempts == attempt
        assert fresh(notification).email_next_attempt_at == due + timedelta(seconds=wait)
        due += timedelta(seconds=wait)
    with at(due):
        notifications.email_sweep()  # attempt 4 of 4: refused, no more
    gave_up = fresh(notification)
    assert gave_up.email_attempts == 4 and gave_up.email_next_attempt_at is None
    assert gave_up.email_sent_at is None and "421" in gave_up.email_last_error
    smtp.refusing = False
    with at(due + timedelta(days=1)):
        assert notifications.email_sweep() == 0
    assert smtp.connections == 4 and smtp.messages == []


def test_an_email_claimed_by_a_worker_that_died_is_sent_after_its_lease(smtp, notification, t0):
    smtp.refusing = False
    with at(t0):
        # A worker claims the e-mail and dies before sending it (or before recording the send).
        assert notifications.email_claim(notification_id=notification.pk)
        assert notifications.send_emails(notification_ids=[str(notification.pk)]) == 0
    lease_end = t0 + timedelta(seconds=300)
    with at(lease_end - timedelta(seconds=1)):
        assert notifications.email_sweep() == 0
    assert smtp.messages == []
    with at(lease_end + timedelta(seconds=1)):
        assert notifications.email_sweep() == 1
    assert len(smtp.messages) == 1
    assert fresh(notification).email_attempts == 2 and fresh(notification).email_sent_at is not None


def test_a_user_without_an_address_is_not_retried(smtp, notification, admin, t0):
    admin.user.email = ""
    admin.user.save()
    smtp.refusing = False
    with at(t0):
        assert notifications.email_sweep() == 0
    skipped = fresh(notification)
    assert skipped.email_next_attempt_at is None and "no e-mail address" in skipped.email_last_error
    assert smtp.connections == 0


def test_the_sweep_is_a_beat_task(settings):
    schedule = settings.CELERY_BEAT_SCHEDULE["external-mcp-email-sweep"]
    assert schedule["task"] == "external_mcp.tasks.email_sweep"
    assert schedule["schedule"] == settings.EXTERNAL_MCP_EMAIL_SWEEP_SECONDS


def test_the_last_error_is_shown_where_notifications_are_listed(smtp, notification, admin_web, t0):
    with at(t0):
        notifications.email_sweep()
    page = admin_web.get("/notifications/").content.decode()
    assert "E-mail not sent yet" in page and "421" in page and "attempt 1 of 4" in page


def test_django_admin_lists_email_attempts_and_errors(smtp, notification, admin_client, t0):
    with at(t0):
        notifications.email_sweep()
    page = admin_client.get("/admin/external_mcp/notification/").content.decode()
    assert "mail-me has a problem" in page and "421" in page
    detail = admin_client.get(f"/admin/external_mcp/notification/{notification.pk}/change/").content.decode()
    assert "Service not available" in detail


def test_a_last_attempt_whose_worker_died_is_given_up_not_retried_for_ever(smtp, notification, t0, settings):
    settings.EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS = 1
    smtp.refusing = False
    with at(t0):
        assert notifications.email_claim(notification_id=notification.pk)  # and the worker dies
    with at(t0 + timedelta(seconds=301)):
        assert notifications.email_sweep() == 0
    gave_up = fresh(notification)
    assert gave_up.email_next_attempt_at is None and "Gave up after 1 attempts" in gave_up.email_last_error
    assert smtp.connections == 0


def test_a_mail_server_that_is_not_listening_is_a_retried_connection_error(notification, settings, t0):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    closed = reserve_port()
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", closed.getsockname()[1], 5
    with at(t0):
        assert notifications.email_sweep() == 0
    failed = fresh(notification)
    assert "ConnectionRefusedError" in failed.email_last_error
    assert failed.email_next_attempt_at == t0 + timedelta(seconds=60)
    closed.close()
