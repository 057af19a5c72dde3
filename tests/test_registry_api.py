from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from external_mcp.models import AuditEvent, ExternalMcpCredential, ExternalMcpServer
from twinmcp import services as core_services

URL = "/api/v1/external-mcp/servers/"


@pytest.fixture(autouse=True)
def _allow_loopback(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


def body(**over):
    data = {"name": "s1", "base_url": "https://93.184.215.14/mcp", "auth_type": "bearer",
            "credentials": {"token": "canary-123"}}
    data.update(over)
    return data


def create(actor, **over):
    return actor.client().post(URL, body(**over), format="json")


def test_admin_creates_server_without_secret_in_response(admin, flag_on):
    response = create(admin)
    assert response.status_code == 201, response.json()
    data = response.json()
    assert "canary-123" not in response.content.decode()
    assert data["has_credentials"] is True
    assert data["credential"]["fingerprint"].startswith("sha256:")
    assert data["status"] == "new" and data["workspace"] == "acme" and data["created_by"] == "alice"
    assert AuditEvent.objects.filter(action="create", server_id=data["id"]).count() == 1


def test_metadata_address_is_refused_with_reason(admin, flag_on):
    response = create(admin, base_url="http://169.254.169.254/mcp")
    assert response.status_code == 400
    assert "metadata" in response.json()["base_url"][0]


def test_loopback_refused_unless_allowed(admin, flag_on, settings):
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = []
    response = create(admin, base_url="http://127.0.0.1:9/mcp")
    assert response.status_code == 400
    assert "loopback" in response.json()["base_url"][0]
    assert "EXTERNAL_MCP_ALLOWED_NETWORKS" in response.json()["base_url"][0]


@pytest.mark.parametrize(
    ("auth_type", "credentials", "field"),
    [
        ("bearer", {}, "credentials.token"),
        ("bearer", {"token": ""}, "credentials.token"),
        ("bearer", {"token": 5}, "credentials.token"),
        ("bearer", {"token": "a\r\nX-Evil: 1"}, "credentials.token"),
        ("bearer", {"token": "x", "extra": "y"}, "credentials.extra"),
        ("bearer", "just-a-string", "credentials"),
        ("basic", {"username": "u"}, "credentials.password"),
        ("basic", {"username": "a:b", "password": "p"}, "credentials.username"),
        ("api_key", {"header": "Bad Header", "value": "v"}, "credentials.header"),
        ("api_key", {"header": "Host", "value": "v"}, "credentials.header"),
        ("api_key", {"header": "Mcp-Session-Id", "value": "v"}, "credentials.header"),
        ("api_key", {"header": "X-Key"}, "credentials.value"),
        ("mtls", {"client_cert_pem": "x"}, "credentials.client_key_pem"),
        ("none", {"token": "x"}, "credentials"),
        ("oauth2", {"token": "x"}, "credentials.token"),
        ("magic", None, "auth_type"),
    ],
)
def test_wrong_credentials_name_the_field(admin, flag_on, auth_type, credentials, field):
    response = create(admin, auth_type=auth_type, credentials=credentials)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert not ExternalMcpServer.objects.exists()


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"base_url": "not a url"}, "base_url"),
        ({"tags": "nope"}, "tags"),
        ({"tags": ["a" * 41]}, "tags"),
        ({"enabled": "sometimes"}, "enabled"),
        ({"transport": "websocket"}, "transport"),
        ({"check_interval_seconds": 1}, "check_interval_seconds"),
        ({"workspace": "globex"}, "workspace"),
        ({"prefix": "Has Spaces"}, "prefix"),
        ({"prefix": "a__b"}, "prefix"),
        ({"prefix": "x" * 25}, "prefix"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_bad_fields_are_400_naming_the_field(admin, flag_on, outsider, over, field):
    response = create(admin, **over)
    assert response.status_code == 400
    assert field in response.json()


def test_api_key_auth_type_defaults_header(admin, flag_on):
    response = create(admin, auth_type="api_key", credentials={"value": "k-123"})
    assert response.status_code == 201
    assert response.json()["auth_type"] == "api_key"


def test_none_auth_has_no_credentials(admin, flag_on):
    response = create(admin, auth_type="none", credentials=None, base_url="http://127.0.0.1:8765/mcp")
    assert response.status_code == 201
    assert response.json()["has_credentials"] is False and response.json()["credential"] is None


def test_name_is_unique_per_workspace_case_insensitive(admin, flag_on, outsider):
    assert create(admin, name="Search").status_code == 201
    response = create(admin, name="search")
    assert response.status_code == 400 and "name" in response.json()
    assert create(outsider, name="search").status_code == 201


def test_list_filters_and_pagination(admin, member, flag_on, django_assert_max_num_queries):
    create(admin, name="alpha", tags=["prod", "EU"], description="billing tools")
    create(admin, name="beta", tags=["dev"], enabled=False)
    create(admin, name="gamma")
    client = member.client()
    names = lambda r: [s["name"] for s in r.json()["results"]]  # noqa: E731
    assert names(client.get(URL)) == ["alpha", "beta", "gamma"]
    assert names(client.get(URL, {"tag": "eu"})) == ["alpha"]
    assert names(client.get(URL, {"status": "disabled"})) == ["beta"]
    assert names(client.get(URL, {"search": "BILLING"})) == ["alpha"]
    assert names(client.get(URL, {"limit": 1, "offset": 1})) == ["beta"]
    assert client.get(URL, {"status": "bogus"}).status_code == 400
    with django_assert_max_num_queries(8):
        assert client.get(URL).json()["count"] == 3


def test_list_query_count_does_not_grow_with_servers(admin, flag_on):
    for i in range(3):
        create(admin, name=f"s{i}")
    with CaptureQueriesContext(connection) as few:
        admin.client().get(URL)
    for i in range(3, 12):
        create(admin, name=f"s{i}")
    with CaptureQueriesContext(connection) as many:
        admin.client().get(URL)
    assert len(many) == len(few)


def test_member_reads_but_cannot_write(admin, member, flag_on):
    server_id = create(admin).json()["id"]
    client = member.client()
    assert client.get(f"{URL}{server_id}/").status_code == 200
    assert client.post(URL, body(name="m"), format="json").status_code == 403
    assert client.patch(f"{URL}{server_id}/", {"name": "x"}, format="json").status_code == 403
    assert client.delete(f"{URL}{server_id}/").status_code == 403
    assert client.put(f"{URL}{server_id}/credentials/", {"credentials": {"token": "t"}},
                      format="json").status_code == 403


def test_outsider_gets_404_not_403(admin, outsider, flag_on):
    server_id = create(admin).json()["id"]
    client = outsider.client()
    for method in ("get", "patch", "delete"):
        assert getattr(client, method)(f"{URL}{server_id}/").status_code == 404
    assert client.put(f"{URL}{server_id}/credentials/", {"credentials": {"token": "t"}},
                      format="json").status_code == 404
    assert client.get(URL).json()["count"] == 0


def test_api_key_is_bound_to_its_workspace(admin, outsider, flag_on):
    core_services.member_add(workspace=outsider.workspace, user=admin.user, role="admin")
    other_id = create(outsider, name="theirs").json()["id"]
    assert admin.client().get(f"{URL}{other_id}/").status_code == 404
    assert create(admin, workspace="globex").status_code == 400


def test_flag_off_is_404_everywhere(admin, db):
    assert admin.client().get(URL).status_code == 404
    assert create(admin).status_code == 404


def test_unauthenticated_is_401(db):
    assert APIClient().get(URL).status_code == 401


def test_patch_updates_and_audits_without_secrets(admin, flag_on):
    server_id = create(admin).json()["id"]
    response = admin.client().patch(f"{URL}{server_id}/", {"description": "new", "tags": ["a"]}, format="json")
    assert response.status_code == 200 and response.json()["tags"] == ["a"]
    event = AuditEvent.objects.get(action="update")
    assert event.changes == {"description": "new", "tags": ["a"]}
    response = admin.client().patch(f"{URL}{server_id}/", {"enabled": False}, format="json")
    assert response.json()["status"] == "disabled"
    response = admin.client().patch(f"{URL}{server_id}/", {"credentials": {"token": "x"}}, format="json")
    assert response.status_code == 400 and "credentials" in response.json()


def test_patch_changing_auth_type_requires_new_credentials(admin, flag_on):
    server_id = create(admin).json()["id"]
    client = admin.client()
    response = client.patch(f"{URL}{server_id}/", {"auth_type": "basic"}, format="json")
    assert response.status_code == 400 and "credentials" in response.json()
    response = client.patch(f"{URL}{server_id}/", {"auth_type": "none"}, format="json")
    assert response.status_code == 200 and response.json()["has_credentials"] is False
    assert not ExternalMcpCredential.objects.exists()


def test_rename_to_taken_name_is_400(admin, flag_on):
    create(admin, name="one")
    second = create(admin, name="two").json()["id"]
    response = admin.client().patch(f"{URL}{second}/", {"name": "ONE"}, format="json")
    assert response.status_code == 400 and "name" in response.json()


def test_rotate_replaces_secret_and_sets_rotated_at(admin, flag_on):
    server_id = create(admin).json()["id"]
    before = ExternalMcpCredential.objects.get(server_id=server_id)
    response = admin.client().put(f"{URL}{server_id}/credentials/", {"credentials": {"token": "canary-456"}},
                                  format="json")
    assert response.status_code == 200
    after = ExternalMcpCredential.objects.get(server_id=server_id)
    assert after.rotated_at is not None and after.fingerprint != before.fingerprint
    assert after.ciphertext != before.ciphertext
    assert response.json()["credential"]["rotated_at"] is not None
    assert AuditEvent.objects.filter(action="credentials.rotate").count() == 1
    bad = admin.client().put(f"{URL}{server_id}/credentials/", {"credentials": {"nope": 1}}, format="json")
    assert bad.status_code == 400 and "credentials.nope" in bad.json()
    missing = admin.client().put(f"{URL}{server_id}/credentials/", {}, format="json")
    assert missing.status_code == 400 and "credentials" in missing.json()


def test_delete_removes_server_and_credentials_keeps_audit(admin, flag_on):
    server_id = create(admin).json()["id"]
    assert admin.client().delete(f"{URL}{server_id}/").status_code == 204
    assert not ExternalMcpServer.objects.exists() and not ExternalMcpCredential.objects.exists()
    assert AuditEvent.objects.filter(action="delete", server_name="s1").exists()
    assert admin.client().get(f"{URL}{server_id}/").status_code == 404


def test_max_per_workspace_is_409(admin, flag_on, settings):
    settings.EXTERNAL_MCP_MAX_PER_ORG = 2
    assert create(admin, name="a").status_code == 201
    assert create(admin, name="b").status_code == 201
    response = create(admin, name="c")
    assert response.status_code == 409
    assert "maximum" in response.json()["detail"]


@pytest.mark.django_db(transaction=True)
def test_max_per_workspace_holds_under_concurrent_creations(admin, flag_on, settings):
    settings.EXTERNAL_MCP_MAX_PER_ORG = 1
    barrier = threading.Barrier(4)
    codes: list[int] = []

    def worker(i: int) -> None:
        from django.db import connections

        barrier.wait()
        try:
            codes.append(create(admin, name=f"c{i}").status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201, 409, 409, 409]
    assert ExternalMcpServer.objects.filter(workspace=admin.workspace).count() == 1


def test_session_admin_can_create_via_api(client, admin, flag_on):
    client.force_login(admin.user)
    response = client.post(URL, body(), content_type="application/json")
    assert response.status_code == 201


def test_a_prefix_is_derived_unique_editable_and_checked(admin, flag_on):
    first = create(admin, name="GitHub Enterprise").json()
    second = create(admin, name="github enterprise!").json()
    assert (first["prefix"], second["prefix"]) == ("github-enterprise", "github-enterprise-2")
    assert create(admin, name="Chosen", prefix="gh").json()["prefix"] == "gh"
    taken = create(admin, name="Other", prefix="gh")
    assert taken.status_code == 400 and "prefix" in taken.json(), taken.json()
    url = f"{URL}{second['id']}/"
    clash = admin.client().patch(url, {"prefix": "github-enterprise"}, format="json")
    assert clash.status_code == 400 and list(clash.json()) == ["prefix"]
    renamed = admin.client().patch(url, {"prefix": "ghe_2"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["prefix"] == "ghe_2"
    assert AuditEvent.objects.filter(server_id=second["id"], action="update").get().changes["prefix"] == "ghe_2"


def test_prefixes_are_per_workspace(admin, flag_on, outsider):
    assert create(admin, name="Shared name").json()["prefix"] == "shared-name"
    assert create(outsider, name="Shared name").json()["prefix"] == "shared-name"


def test_existing_servers_get_prefixes_like_new_ones(admin, flag_on):
    """The migration's backfill: from the name, unique in the workspace, oldest first."""
    import importlib

    from django.apps import apps

    backfill = importlib.import_module("external_mcp.migrations.0004_server_prefix").derive_prefixes
    ids = [create(admin, name=name).json()["id"] for name in ("Mail", "mail!", "Café")]
    for number, server_id in enumerate(reversed(ids)):
        ExternalMcpServer.objects.filter(pk=server_id).update(prefix=f"before{number}")
    backfill(apps, None)
    assert [ExternalMcpServer.objects.get(pk=i).prefix for i in ids] == ["mail", "mail-2", "cafe"]


def test_tools_show_their_exposed_names(admin, flag_on):
    from external_mcp import catalog

    server_id = create(admin, name="Files", auth_type="none", credentials=None).json()["id"]
    server = ExternalMcpServer.objects.get(pk=server_id)
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in ("read", "read file", "bad\x00")]
    catalog.catalog_sync(server=server, tools=tools)
    listed = {t["name"]: t["exposed_name"] for t in admin.client().get(f"{URL}{server_id}/tools/").json()}
    assert listed["read"] == "files__read"
    head = "files__read_file_"
    assert listed["read file"].startswith(head) and len(listed["read file"]) == len(head) + 8
    refused = [name for name in listed if name.startswith(" ")]  # stored under a key, never exposed
    assert len(refused) == 1 and listed[refused[0]] is None
