"""Domain code queues Celery work by task name; a broker that is down never fails the caller."""

from __future__ import annotations

import logging

import pytest
import redis as redis_lib
from celery import Celery, current_app

from external_mcp import queue
from external_mcp.models import ExternalMcpServer
from tests.mcp_peers import reserve_port
from twinmcp.celery import app as celery_app


@pytest.fixture
def broker(redis_url):
    """The suite's Redis, the broker under `make test` as in production."""
    client = redis_lib.Redis.from_url(redis_url)
    client.delete("celery")
    yield client
    client.delete("celery")
    client.close()


def test_a_check_is_sent_to_the_broker_by_name(broker):
    assert queue.queue_check("0b9f6a8e-6d51-4c57-9a53-3f2d8e0b1c2d")
    [message] = broker.lrange("celery", 0, -1)
    assert b"external_mcp.tasks.check_server" in message and b"0b9f6a8e-6d51-4c57-9a53-3f2d8e0b1c2d" in message


def test_a_broker_that_is_down_is_a_warning_not_a_failure(spare_redis, caplog):
    spare_redis.start()
    app = Celery("twinmcp-test", broker=spare_redis.url, set_as_current=True)
    try:
        assert queue.queue_emails(["x"]) is True
        spare_redis.stop()
        with caplog.at_level(logging.WARNING, logger="external_mcp.queue"):
            assert queue.queue_emails(["y"]) is False
    finally:
        celery_app.set_current()
        app.close()
    assert "could not queue send_notification_emails" in caplog.text


@pytest.mark.django_db
def test_in_eager_mode_the_task_runs_inline(admin, settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    closed = reserve_port()
    server = ExternalMcpServer.objects.create(workspace=admin.workspace, name="gone",
                                              base_url=f"http://127.0.0.1:{closed.getsockname()[1]}/mcp")
    current_app.conf.task_always_eager = True
    try:
        assert queue.queue_check(server.pk)
    finally:
        current_app.conf.task_always_eager = False
        closed.close()
    server.refresh_from_db()
    assert server.last_checked_at is not None and server.consecutive_failures == 1
