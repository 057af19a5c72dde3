"""Moving a server to another origin (scheme, host or port) must not carry its secret or its
tool approvals along: the stored secret would otherwise be sent to whoever runs the new host,
and tools approved on one host would be callable on another."""

from __future__ import annotations

import pytest

from external_mcp import catalog, health, services
from external_mcp.models import AuditEvent, ExternalMcpCredential, ExternalMcpServer, ExternalMcpTool
from tests import mcp_peers
from twinmcp import invalidation

URL = "/api/v1/external-mcp/servers/"
HOME = "https://93.184.215.14/mcp"
TOOLS = [{"name": "search", "inputSchema": {"type": "object"}}, {"name": "fetch", "inputSchema": {"type": "object"}},
         {"name": "gone", "inputSchema": {"type": "object"}}]


@pytest.fixture(autouse=True)
def _allow_loopback(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


def registered(admin, *, auth_type: str = "bearer", credentials: dict | None = None,
               base_url: str = HOME) -> ExternalMcpServer:
    """A server with three tools: two approved, one approved and since removed upstream."""
    if auth_type == "bearer" and credentials is None:
        credentials = {"token": "old-secret"}
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="s1", base_url=base_url,
                                    auth_type=auth_type, credentials=credentials)
    catalog.catalog_sync(server=server, tools=TOOLS)
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    catalog.catalog_sync(server=server, tools=TOOLS[:2])
    return server


def states(server: ExternalMcpServer) -> dict[str, tuple[str, bool]]:
    return {t.name: (t.state, bool(t.approved_hash)) for t in ExternalMcpTool.objects.filter(server=server)}


APPROVED = {"search": ("approved", True), "fetch": ("approved", True), "gone": ("removed", True)}
RESET = {"search": ("pending", False), "fetch": ("pending", False), "gone": ("removed", False)}


def patch(admin, server, body: dict):
    return admin.client().patch(f"{URL}{server.pk}/", body, format="json")


@pytest.mark.parametrize("new_url", [
    "https://93.184.215.15/mcp",  # another host
    "http://93.184.215.14/mcp",  # another scheme
    "https://93.184.215.14:8443/mcp",  # another port
    "https://example.com/mcp",  # a name instead of the address
])
def test_moving_to_another_origin_without_credentials_is_400_naming_credentials_and_changes_nothing(
        admin, flag_on, new_url):
    server = registered(admin)
    stored = ExternalMcpCredential.objects.get(server=server)
    response = patch(admin, server, {"base_url": new_url, "description": "moved"})
    assert response.status_code == 400, response.json()
    assert "origin" in response.json()["credentials"][0]
    server.refresh_from_db()
    assert (server.base_url, server.description) == (HOME, "")
    assert ExternalMcpCredential.objects.get(server=server).ciphertext == stored.ciphertext
    assert states(server) == APPROVED
    assert not AuditEvent.objects.filter(action="update").exists()


def test_moving_with_new_credentials_replaces_the_secret_and_returns_every_tool_to_pending(
        admin, flag_on, django_capture_on_commit_callbacks):
    server = registered(admin)
    before = ExternalMcpCredential.objects.get(server=server)
    generation = invalidation.generation()
    with django_capture_on_commit_callbacks(execute=True):
        response = patch(admin, server, {"base_url": "https://93.184.215.15/mcp",
                                         "credentials": {"token": "new-secret"}})
    assert response.status_code == 200, response.json()
    assert "new-secret" not in response.content.decode()
    server.refresh_from_db()
    assert server.base_url == "https://93.184.215.15/mcp"
    after = ExternalMcpCredential.objects.get(server=server)
    assert after.fingerprint != before.fingerprint and after.rotated_at is not None
    assert services.credentials_payload(server=server) == {"token": "new-secret"}
    assert states(server) == RESET
    assert all(t.approved_at is None and t.approved_by is None and t.approved_definition is None
               for t in ExternalMcpTool.objects.filter(server=server))
    event = AuditEvent.objects.get(action="update")
    assert event.changes["base_url"] == "https://93.184.215.15/mcp"
    assert event.changes["fingerprint"] == after.fingerprint
    assert event.changes["tools_reset"] == ["fetch", "search"]
    assert "new-secret" not in repr(event.changes) and "old-secret" not in repr(event.changes)
    assert invalidation.generation() > generation


@pytest.mark.parametrize("new_url", [
    "https://93.184.215.14/v2/mcp",
    "https://93.184.215.14:443/mcp?tenant=a",
    "HTTPS://93.184.215.14/other",
])
def test_a_change_within_the_same_origin_keeps_credentials_and_approvals(admin, flag_on, new_url):
    server = registered(admin)
    before = ExternalMcpCredential.objects.get(server=server)
    response = patch(admin, server, {"base_url": new_url})
    assert response.status_code == 200, response.json()
    assert ExternalMcpCredential.objects.get(server=server).ciphertext == before.ciphertext
    assert states(server) == APPROVED
    assert "tools_reset" not in AuditEvent.objects.get(action="update").changes


def test_credentials_with_a_same_origin_change_are_still_refused(admin, flag_on):
    server = registered(admin)
    response = patch(admin, server, {"base_url": "https://93.184.215.14/v2", "credentials": {"token": "x"}})
    assert response.status_code == 400 and "credentials" in response.json()
    server.refresh_from_db()
    assert server.base_url == HOME


def test_invalid_credentials_with_a_move_are_400_naming_the_field(admin, flag_on):
    server = registered(admin)
    response = patch(admin, server, {"base_url": "https://93.184.215.15/mcp", "credentials": {"tok": "x"}})
    assert response.status_code == 400
    assert {"credentials.token", "credentials.tok"} <= set(response.json())
    assert states(server) == APPROVED


def test_a_server_without_credentials_moves_freely_but_its_tools_return_to_pending(admin, flag_on):
    server = registered(admin, auth_type="none")
    response = patch(admin, server, {"base_url": "https://93.184.215.15/mcp"})
    assert response.status_code == 200, response.json()
    assert states(server) == RESET
    assert not ExternalMcpCredential.objects.filter(server=server).exists()


def test_moving_and_changing_the_auth_type_takes_the_new_types_credentials(admin, flag_on):
    server = registered(admin)
    response = patch(admin, server, {"base_url": "https://93.184.215.15/mcp", "auth_type": "basic"})
    assert response.status_code == 400 and "credentials" in response.json()
    response = patch(admin, server, {"base_url": "https://93.184.215.15/mcp", "auth_type": "basic",
                                     "credentials": {"username": "u", "password": "p"}})
    assert response.status_code == 200, response.json()
    assert services.credentials_payload(server=server) == {"username": "u", "password": "p"}
    assert states(server) == RESET


def test_after_a_move_the_new_host_sees_only_the_new_secret(admin, flag_on):
    """End to end: a real check after the move authenticates to the new host with the new secret only."""
    def check() -> None:
        result, _ = health.check_now(ExternalMcpServer.objects.select_related("credential").get(pk=server.pk))
        assert result.ok, result.error_message

    with mcp_peers.running(mcp_peers.bearer_peer("old-secret"), mcp_peers.bearer_peer("new-secret")) as (old, new):
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="s1", base_url=old.url,
                                        auth_type="bearer", credentials={"token": "old-secret"})
        check()
        assert catalog.tools_approve(server=server, actor=admin.user, select_all=True)
        assert patch(admin, server, {"base_url": new.url}).status_code == 400
        response = patch(admin, server, {"base_url": new.url, "credentials": {"token": "new-secret"}})
        assert response.status_code == 200, response.json()
        check()
        sent = [r.headers.get("authorization", "") for r in new.requests]
        assert sent and all(value == "Bearer new-secret" for value in sent)
        assert {state for state, approved in states(server).values() if not approved} == {"pending"}
        assert not any(approved for _, approved in states(server).values())


# -- the web form ---------------------------------------------------------------------------------


def edit(client, server, **over):
    data = {"name": "s1", "base_url": HOME, "description": "", "tags": "", "auth_type": "bearer"}
    data.update(over)
    return client.post(f"/servers/{server.pk}/edit/", data)


def test_edit_form_asks_for_the_secret_again_when_the_origin_changes_and_keeps_what_was_typed(admin_web, admin):
    server = registered(admin)
    response = edit(admin_web, server, base_url="https://93.184.215.15/mcp", name="renamed",
                    description="typed text")
    assert response.status_code == 400
    page = response.content.decode()
    assert "origin" in page and "enter the secret again" in page.lower()
    assert "https://93.184.215.15/mcp" in page and "renamed" in page and "typed text" in page
    assert "old-secret" not in page
    server.refresh_from_db()
    assert (server.name, server.base_url) == ("s1", HOME)
    assert states(server) == APPROVED
    response = edit(admin_web, server, base_url="https://93.184.215.15/mcp", **{"cred-token": "new-secret"})
    assert response.status_code == 302
    server.refresh_from_db()
    assert server.base_url == "https://93.184.215.15/mcp"
    assert services.credentials_payload(server=server) == {"token": "new-secret"}
    assert states(server) == RESET


def test_edit_form_path_change_keeps_the_secret_without_asking(admin_web, admin):
    server = registered(admin)
    assert edit(admin_web, server, base_url="https://93.184.215.14/v2/mcp").status_code == 302
    assert services.credentials_payload(server=server) == {"token": "old-secret"}
    assert states(server) == APPROVED


def test_edit_form_for_an_api_key_server_asks_for_the_value_again(admin_web, admin):
    server = registered(admin, auth_type="api_key", credentials={"header": "X-Key", "value": "old-secret"})
    response = edit(admin_web, server, auth_type="api_key", base_url="https://93.184.215.15/mcp",
                    **{"cred-header": "X-Key"})
    assert response.status_code == 400
    assert "old-secret" not in response.content.decode()
    response = edit(admin_web, server, auth_type="api_key", base_url="https://93.184.215.15/mcp",
                    **{"cred-header": "X-Key", "cred-value": "new-secret"})
    assert response.status_code == 302
    assert services.credentials_payload(server=server) == {"header": "X-Key", "value": "new-secret"}
