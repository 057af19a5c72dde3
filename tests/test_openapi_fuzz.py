"""schemathesis drives every documented operation with generated input: never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from external_mcp import services


@pytest.fixture
def wsgi_app():
    """The real WSGI app, minus the per-request connection closing (the test holds one transaction)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def seeded(admin, member, flag_on, settings):
    settings.ALLOWED_HOSTS = ["*"]
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="seed",
                                    base_url="https://93.184.215.14/mcp", auth_type="bearer",
                                    credentials={"token": "t"})
    return server


def test_schema_operations_never_answer_5xx(seeded, admin, wsgi_app):
    schema = schemathesis.openapi.from_wsgi("/api/schema/", wsgi_app)
    # The MCP proxy path is served by the ASGI router, not this WSGI app: tests/test_proxy.py covers it.
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if not op.path.endswith("/mcp")]
    assert len(operations) >= 7
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=30, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def exercise(case) -> None:
            if "server_id" in (case.path_parameters or {}) and case.path_parameters["server_id"].endswith("0"):
                case.path_parameters["server_id"] = str(seeded.pk)
            response = case.call(headers={"Authorization": f"Bearer {admin.raw_key}"})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}")

        exercise()
    assert failures == []
