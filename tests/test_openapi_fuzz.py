"""schemathesis drives every documented operation with generated input: never a 5xx."""

from __future__ import annotations

import json
import uuid

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from rest_framework.test import APIClient

from external_mcp import services, toolsets
from usage import alerts
from usage.models import AlertKind


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
    # On loopback (a closed port): the test endpoint really checks it, and no test sends traffic beyond.
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="seed",
                                    base_url="http://127.0.0.1:9/mcp", auth_type="bearer",
                                    credentials={"token": "t"})
    return server


@pytest.fixture
def seeded_toolset(seeded, admin):
    return toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name="seed set",
                                   servers=[str(seeded.pk)])


@pytest.fixture
def seeded_rule(seeded, admin):
    return alerts.alert_rule_create(workspace=admin.workspace, actor=admin.user, kind=AlertKind.MEMBER_DAILY_CALLS,
                                    threshold=100)


def test_schema_operations_never_answer_5xx(seeded, seeded_toolset, seeded_rule, admin, wsgi_app):
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
            if "toolset_id" in (case.path_parameters or {}) and case.path_parameters["toolset_id"].endswith("0"):
                case.path_parameters["toolset_id"] = str(seeded_toolset.pk)
            response = case.call(headers={"Authorization": f"Bearer {admin.raw_key}"})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}")

        exercise()
    assert failures == []


# -- hostile inputs, for every operation the schema documents --------------------------------------

DEEP_JSON = "[" * 100_000 + "]" * 100_000
HOSTILE_VALUES = ["%00", "a%00b", "%ff%fe", "%c3%28", "%C2%B2", "9" * 30, "-" + "9" * 30, ""]  # %C2%B2: "²"
OUT_OF_RANGE_INTEGERS = ["9" * 30, "99999999999999999999", "2147483648", "-1", "1.5", "0x10", "1e3", "%00"]
PATH_VALUES = ["%00", "9" * 30, "not-a-uuid", "%ff", "00000000-0000-0000-0000-00000000000g"]


def documented_operations(client: APIClient) -> list[tuple[str, str, dict]]:
    schema = client.get("/api/schema/", {"format": "json"}).json()
    return [(method.upper(), path, operation)
            for path, item in schema["paths"].items() if not path.endswith("/mcp")
            for method, operation in item.items()]


def body_properties(client: APIClient, operation: dict) -> list[str]:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if not content:
        return []
    schema = content["schema"]
    if "$ref" in schema:
        components = client.get("/api/schema/", {"format": "json"}).json()["components"]["schemas"]
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return list(schema.get("properties", {}))


def test_hostile_inputs_on_every_documented_operation_get_json_4xx(seeded, seeded_toolset, seeded_rule, admin,
                                                                   settings):
    """Huge and malformed integers in every integer query parameter (a 400 naming it), NULs and
    invalid UTF-8 in every parameter, malformed path ids (JSON 404), JSON nested 100,000 deep and
    bodies over the upload limit on every operation that takes a body: never a 5xx, never HTML."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = len(DEEP_JSON) + 100
    oversized = "d" * (len(DEEP_JSON) + 101)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {admin.raw_key}")
    failures: list[str] = []

    def call(method: str, url: str, body: str | None = None, content_type: str = "application/json",
             expect: int | None = None, names: str | None = None) -> None:
        response = client.generic(method, url, body or "", content_type=content_type)
        what = f"{method} {url[:120]} -> {response.status_code}"
        if response.status_code >= 500:
            failures.append(what)
        elif response.status_code >= 400 and not response["Content-Type"].startswith("application/json"):
            failures.append(f"{what} answered {response['Content-Type']}")
        elif expect is not None and response.status_code != expect:
            failures.append(f"{what}, expected {expect}")
        elif names is not None and names not in response.json():
            failures.append(f"{what} does not name {names}: {response.content[:200]!r}")

    operations = documented_operations(client)
    assert len(operations) >= 15
    for method, path, operation in operations:
        parameters = operation.get("parameters", [])
        url = (path.replace("{server_id}", str(seeded.pk)).replace("{toolset_id}", str(seeded_toolset.pk))
               .replace("{key_id}", str(uuid.uuid4())).replace("{workspace_id}", str(seeded.workspace_id))
               .replace("{user_id}", str(admin.user.pk)).replace("{rule_id}", str(seeded_rule.pk)))
        for parameter in parameters:
            name, kind = parameter["name"], parameter["schema"].get("type")
            if parameter["in"] == "path":
                for value in PATH_VALUES:
                    call(method, path.replace("{" + name + "}", value).replace("{server_id}", str(seeded.pk)),
                         expect=404)
            elif parameter["in"] == "query":
                for value in HOSTILE_VALUES:
                    call(method, f"{url}?{name}={value}")
                if kind == "integer":
                    for value in OUT_OF_RANGE_INTEGERS:
                        call(method, f"{url}?{name}={value}", expect=400, names=name)
        if "requestBody" in operation:
            call(method, url, DEEP_JSON, expect=400)
            call(method, url, json.dumps({"description": oversized}), expect=413)
            call(method, url, "description=" + oversized, "application/x-www-form-urlencoded", expect=413)
            call(method, url, b'{"name": "\xff\xfe"}', expect=400)
            properties = body_properties(client, operation)
            call(method, url, json.dumps(dict.fromkeys(properties, "x\u0000y")))
            call(method, url, json.dumps(dict.fromkeys(properties, 9 ** 40)))
            call(method, url, json.dumps(dict.fromkeys(properties, [[[[[[["deep"]]]]]]])))
    assert failures == []
