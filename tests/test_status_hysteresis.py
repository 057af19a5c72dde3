"""Status from hard facts: warning after one failure, down after three, healthy on success."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import time_machine
from django.core import mail
from django.utils import timezone

from external_mcp import health, notifications, services
from external_mcp.mcp_client import CheckResult
from external_mcp.models import ExternalMcpServer, HealthCheck, Notification, StatusChange

OK = CheckResult(ok=True, protocol_version="2025-11-25", era="handshake", tools=[{"name": "echo"}], total_ms=12)
FAIL = CheckResult(ok=False, error_class="connect", error_message="Cannot connect to 127.0.0.1:9: refused.",
                   total_ms=3)


@pytest.fixture
def server(admin, member):
    admin.user.email = "alice@example.com"
    admin.user.save()
    return services.server_create(workspace=admin.workspace, actor=admin.user, name="h",
                                  base_url="https://93.184.215.14/mcp")


def record(server, result):
    return health.record_check(server=ExternalMcpServer.objects.get(pk=server.pk), result=result)


def test_new_until_first_check_then_healthy(server):
    assert server.status == "new"
    s = record(server, OK)
    assert s.status == "healthy" and s.consecutive_failures == 0 and s.last_ok_at and s.protocol_version
    assert not Notification.objects.exists()


def test_one_failure_warns_three_go_down_success_recovers(server):
    record(server, OK)
    assert record(server, FAIL).status == "warning"
    assert record(server, FAIL).status == "warning"
    s = record(server, FAIL)
    assert s.status == "down" and s.consecutive_failures == 3
    assert "Cannot connect" in s.error_message and "running" in s.error_message
    assert record(server, FAIL).status == "down"
    assert record(server, OK).status == "healthy"
    assert list(StatusChange.objects.order_by("at").values_list("old", "new")) == [
        ("new", "healthy"), ("healthy", "warning"), ("warning", "down"), ("down", "healthy")]
    kinds = list(Notification.objects.order_by("created_at").values_list("kind", flat=True))
    assert kinds == ["server.warning", "server.down", "server.recovered"]
    assert HealthCheck.objects.filter(server=server).count() == 6


def test_slow_success_is_a_warning(server, settings):
    settings.EXTERNAL_MCP_HEALTH_SLOW_MS = 10
    s = record(server, CheckResult(ok=True, total_ms=50))
    assert s.status == "warning" and "Slow" in s.error_message


def test_disabled_server_is_not_changed_by_checks(server, admin):
    services.server_update(server=server, actor=admin.user, enabled=False)
    assert ExternalMcpServer.objects.get(pk=server.pk).status == "disabled"
    assert record(server, FAIL).status == "disabled"
    services.server_update(server=server, actor=admin.user, enabled=True)
    assert ExternalMcpServer.objects.get(pk=server.pk).status == "new"


def test_notification_emails_are_sent_once(server, django_capture_on_commit_callbacks):
    record(server, OK)
    record(server, FAIL)
    ids = [str(n.pk) for n in Notification.objects.all()]
    assert notifications.send_emails(notification_ids=ids) == 1
    assert notifications.send_emails(notification_ids=ids) == 0
    assert len(mail.outbox) == 1
    assert mail.outbox[0].subject == "[TwinMCP] h has a problem"
    assert mail.outbox[0].to == ["alice@example.com"]


def test_failure_ratio_alert_is_raised_once(server, admin):
    other = services.server_create(workspace=admin.workspace, actor=admin.user, name="h2",
                                   base_url="https://93.184.215.14/mcp")
    record(server, OK)
    record(other, FAIL)
    record(other, FAIL)
    assert notifications.failure_ratio_alert(workspace_id=admin.workspace.pk)
    assert not notifications.failure_ratio_alert(workspace_id=admin.workspace.pk)
    assert Notification.objects.filter(kind="alert.failure_ratio").count() == 1
    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        assert not notifications.failure_ratio_alert(workspace_id=admin.workspace.pk)  # old checks expired


def test_no_alert_below_thirty_percent(server):
    for _ in range(3):
        record(server, OK)
    record(server, FAIL)
    assert not notifications.failure_ratio_alert(workspace_id=server.workspace_id)


@pytest.mark.django_db(transaction=True)
def test_two_workers_racing_record_one_transition_and_one_notification(admin):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="race",
                                    base_url="https://93.184.215.14/mcp")
    health.record_check(server=ExternalMcpServer.objects.get(pk=server.pk), result=OK)
    stale = [ExternalMcpServer.objects.get(pk=server.pk) for _ in range(4)]
    barrier = threading.Barrier(4)

    def worker(copy):
        from django.db import connections

        barrier.wait()
        try:
            health.record_check(server=copy, result=FAIL)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(c,)) for c in stale]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.refresh_from_db()
    assert server.consecutive_failures == 4
    assert server.status == "down"
    chain = list(StatusChange.objects.filter(server=server).order_by("at").values_list("old", "new"))
    assert chain == [("new", "healthy"), ("healthy", "warning"), ("warning", "down")]
    kinds = sorted(Notification.objects.filter(server=server).values_list("kind", flat=True))
    assert kinds == ["server.down", "server.warning"]
