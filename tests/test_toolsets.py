"""Toolsets: named subsets of a workspace's servers and tools with their own endpoint. Admins
write, members read, anyone else gets a 404; every field error is named; an unprefixed toolset
refuses members whose tool names collide; every write is audited and flushes the gateways' views."""

from __future__ import annotations

import uuid

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from external_mcp import served_catalog, toolsets
from external_mcp.choices import ServerStatus, ToolState
from external_mcp.models import AuditEvent, ExternalMcpServer, ExternalMcpTool, Toolset
from external_mcp.services import server_create
from twinmcp import invalidation
from twinmcp import services as core_services

URL = "/api/v1/external-mcp/toolsets/"
PUBLIC_URL = "https://93.184.215.14/mcp"


def make_server(actor, name: str) -> ExternalMcpServer:
    return server_create(workspace=actor.workspace, actor=actor.user, name=name, base_url=PUBLIC_URL)


def add_tool(server: ExternalMcpServer, name: str, state: str = ToolState.APPROVED) -> ExternalMcpTool:
    definition = {"name": name, "description": f"{name} of {server.name}", "inputSchema": {"type": "object"}}
    approved = state == ToolState.APPROVED
    return ExternalMcpTool.objects.create(
        server=server, name=name, definition=definition, definition_hash=f"hash-{name}", state=state,
        approved_definition=definition if approved else None, approved_hash=f"hash-{name}" if approved else "")


@pytest.fixture
def alpha(admin, flag_on) -> ExternalMcpServer:
    server = make_server(admin, "Alpha")
    for name in ("add", "echo"):
        add_tool(server, name)
    add_tool(server, "draft", ToolState.PENDING)
    return server


@pytest.fixture
def beta(admin, flag_on) -> ExternalMcpServer:
    server = make_server(admin, "Beta")
    for name in ("echo", "search"):
        add_tool(server, name)
    return server


@pytest.fixture
def foreign(outsider, flag_on) -> ExternalMcpServer:
    server = make_server(outsider, "Theirs")
    add_tool(server, "echo")
    return server


def create(actor, **data):
    return actor.client().post(URL, {"name": "Dev", **data}, format="json")


def ids(*servers) -> list[str]:
    return [str(s.pk) for s in servers]


# -- create, read, update, delete -----------------------------------------------------------------


def test_admin_creates_reads_updates_and_deletes_a_toolset_each_write_audited(admin, alpha, beta):
    response = create(admin, description="for the dev agent", servers=ids(alpha),
                      tools=[{"server": str(beta.pk), "name": "search"}])
    assert response.status_code == 201, response.json()
    data = response.json()
    toolset_id = data["id"]
    assert data["name"] == "Dev" and data["description"] == "for the dev agent" and data["prefix_mode"] == "always"
    assert data["servers"] == [{"id": str(alpha.pk), "name": "Alpha", "prefix": "alpha"}]
    assert data["tools"] == [{"server": str(beta.pk), "name": "search"}]
    assert data["endpoint"] == f"http://testserver/api/v1/external-mcp/toolsets/{toolset_id}/mcp"
    assert data["exposed_tools"] == ["alpha__add", "alpha__echo", "beta__search"]  # not the pending draft
    assert data["collisions"] == [] and data["workspace"] == "acme" and data["created_by"] == "alice"
    created = AuditEvent.objects.get(action="toolset.create")
    assert (created.server, created.server_name, created.actor) == (None, "Dev", admin.user)
    assert created.changes == {"toolset": toolset_id, "name": "Dev", "description": "for the dev agent",
                               "prefix_mode": "always", "servers": ids(alpha),
                               "tools": [{"server": str(beta.pk), "name": "search"}]}

    assert admin.client().get(f"{URL}{toolset_id}/").json() == data
    response = admin.client().patch(f"{URL}{toolset_id}/", {"name": "Dev tools", "tools": []}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["exposed_tools"] == ["alpha__add", "alpha__echo"] and response.json()["tools"] == []
    updated = AuditEvent.objects.get(action="toolset.update")
    assert updated.changes == {"toolset": toolset_id, "name": "Dev tools", "tools": []}
    assert updated.server_name == "Dev tools"

    unchanged = admin.client().patch(f"{URL}{toolset_id}/", {"servers": ids(alpha)}, format="json")
    assert unchanged.status_code == 200 and AuditEvent.objects.filter(action="toolset.update").count() == 1

    assert admin.client().delete(f"{URL}{toolset_id}/").status_code == 204
    assert admin.client().get(f"{URL}{toolset_id}/").status_code == 404
    assert not Toolset.objects.exists()
    assert ExternalMcpServer.objects.filter(pk=alpha.pk).exists()  # members stay
    deleted = AuditEvent.objects.get(action="toolset.delete")
    assert (deleted.server_name, deleted.changes) == ("Dev tools", {"toolset": toolset_id})


def test_a_member_server_brings_its_tools_approved_later_a_member_tool_only_itself(admin, alpha, beta):
    toolset_id = create(admin, servers=ids(alpha), tools=[{"server": str(beta.pk), "name": "echo"}]).json()["id"]
    add_tool(alpha, "later")
    add_tool(beta, "later")
    ExternalMcpTool.objects.filter(server=alpha, name="draft").update(
        state=ToolState.APPROVED, approved_definition={"name": "draft", "inputSchema": {}}, approved_hash="h")
    exposed = admin.client().get(f"{URL}{toolset_id}/").json()["exposed_tools"]
    assert exposed == ["alpha__add", "alpha__draft", "alpha__echo", "alpha__later", "beta__echo"]


def test_a_disabled_member_serves_nothing_but_stays_a_member(admin, alpha, beta):
    toolset_id = create(admin, servers=ids(alpha, beta)).json()["id"]
    ExternalMcpServer.objects.filter(pk=beta.pk).update(enabled=False, status=ServerStatus.DISABLED)
    data = admin.client().get(f"{URL}{toolset_id}/").json()
    assert data["exposed_tools"] == ["alpha__add", "alpha__echo"] and len(data["servers"]) == 2


def test_writes_flush_the_gateways_views_when_they_commit(admin, alpha, django_capture_on_commit_callbacks):
    before = invalidation.generation()
    with django_capture_on_commit_callbacks(execute=True):
        toolset = toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name="T", servers=ids(alpha))
    with django_capture_on_commit_callbacks(execute=True):
        toolsets.toolset_update(toolset=toolset, actor=admin.user, prefix_mode="never")
    with django_capture_on_commit_callbacks(execute=True) as nothing:
        toolsets.toolset_update(toolset=toolset, actor=admin.user, prefix_mode="never")
    with django_capture_on_commit_callbacks(execute=True):
        toolsets.toolset_delete(toolset=toolset, actor=admin.user)
    assert invalidation.generation() == before + 3 and nothing == []


# -- who may do what ------------------------------------------------------------------------------


def test_member_reads_but_cannot_write(admin, member, alpha):
    toolset_id = create(admin, servers=ids(alpha)).json()["id"]
    client = member.client()
    assert client.get(URL).json()["results"][0]["id"] == toolset_id
    assert client.get(f"{URL}{toolset_id}/").json()["exposed_tools"] == ["alpha__add", "alpha__echo"]
    assert client.post(URL, {"name": "Mine"}, format="json").status_code == 403
    assert client.patch(f"{URL}{toolset_id}/", {"name": "x"}, format="json").status_code == 403
    assert client.delete(f"{URL}{toolset_id}/").status_code == 403
    assert list(Toolset.objects.values_list("name", flat=True)) == ["Dev"]


def test_outsiders_and_unknown_ids_get_404(admin, outsider, alpha):
    toolset_id = create(admin, servers=ids(alpha)).json()["id"]
    client = outsider.client()
    for method in ("get", "patch", "delete"):
        assert getattr(client, method)(f"{URL}{toolset_id}/", {}, format="json").status_code == 404
    assert client.get(URL).json()["count"] == 0
    assert admin.client().get(f"{URL}{uuid.uuid4()}/").status_code == 404
    assert admin.client().get(f"{URL}not-a-uuid/").status_code == 404
    assert Toolset.objects.filter(pk=toolset_id).exists()


def test_an_api_key_acts_in_its_own_workspace_only(admin, outsider, foreign):
    core_services.member_add(workspace=outsider.workspace, user=admin.user, role="admin")
    theirs = create(outsider, name="Theirs").json()["id"]
    assert admin.client().get(f"{URL}{theirs}/").status_code == 404
    response = create(admin, workspace="globex")
    assert response.status_code == 400 and "workspace" in response.json()


def test_flag_off_is_404_and_no_key_is_401(admin, db):
    from rest_framework.test import APIClient

    assert admin.client().get(URL).status_code == 404
    assert create(admin).status_code == 404
    assert APIClient().get(URL).status_code == 401


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("over", "field", "named"), [
    ({"name": ""}, "name", None),
    ({"name": "x" * 101}, "name", None),
    ({"prefix_mode": "sometimes"}, "prefix_mode", "sometimes"),
    ({"servers": ["not-a-uuid"]}, "servers", None),
    ({"servers": "all"}, "servers", None),
    ({"servers": ["00000000-0000-4000-8000-000000000001"]}, "servers", "00000000-0000-4000-8000-000000000001"),
    ({"tools": [{"server": "00000000-0000-4000-8000-000000000002", "name": "echo"}]}, "tools",
     "00000000-0000-4000-8000-000000000002"),
    ({"tools": ["echo"]}, "tools", None),
    ({"tools": [{"name": "echo"}]}, "tools", None),
    ({"workspace": "globex"}, "workspace", None),
])
def test_bad_fields_are_400_naming_the_field_and_the_value(admin, alpha, outsider, over, field, named):
    response = create(admin, **over)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    if named:
        assert named in str(response.json()[field])
    assert not Toolset.objects.exists() and not AuditEvent.objects.filter(action__startswith="toolset").exists()


def test_servers_and_tools_of_another_workspace_or_unknown_tools_are_named(admin, alpha, foreign):
    response = create(admin, servers=ids(alpha, foreign))
    assert response.status_code == 400 and str(foreign.pk) in response.json()["servers"][0]
    response = create(admin, tools=[{"server": str(foreign.pk), "name": "echo"}])
    assert response.status_code == 400 and str(foreign.pk) in response.json()["tools"][0]
    response = create(admin, tools=[{"server": str(alpha.pk), "name": name} for name in ("echo", "nope")])
    assert response.status_code == 400
    assert response.json()["tools"] == [f"No tool 'nope' on server {alpha.pk} in this workspace."]


def test_the_services_check_what_the_api_does_not_see(admin, alpha):
    def fails(field, **kwargs):
        with pytest.raises(ValidationError) as raised:
            toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, **{"name": "S", **kwargs})
        assert field in raised.value.message_dict, raised.value.message_dict

    fails("servers", servers=[1])
    fails("tools", tools=[{"server": alpha.pk, "name": "ec\x00ho"}])  # never reaches PostgreSQL
    fails("tools", tools=[{"server": alpha.pk, "name": "echo", "extra": 1}])
    fails("description", description="d" * 2001)
    fails("name", name=None)
    toolset = toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name="S")
    with pytest.raises(ValidationError) as raised:
        toolsets.toolset_update(toolset=toolset, actor=admin.user, workspace=None)
    assert "workspace" in raised.value.message_dict


def test_names_are_unique_per_workspace_whatever_the_case(admin, outsider, alpha, foreign):
    assert create(admin, name="Dev").status_code == 201
    response = create(admin, name="dev")
    assert response.status_code == 400 and "name" in response.json()
    other = create(admin, name="Other").json()["id"]
    response = admin.client().patch(f"{URL}{other}/", {"name": "DEV"}, format="json")
    assert response.status_code == 400 and "name" in response.json()
    assert create(outsider, name="dev").status_code == 201


# -- prefix mode -----------------------------------------------------------------------------------


def test_never_prefixed_is_refused_while_tool_names_collide_naming_the_tool_and_both_servers(admin, alpha, beta):
    response = create(admin, servers=ids(alpha, beta), prefix_mode="never")
    assert response.status_code == 400
    assert list(response.json()) == ["prefix_mode"]
    assert "echo (Alpha, Beta)" in response.json()["prefix_mode"][0]
    assert not Toolset.objects.exists() and not AuditEvent.objects.filter(action="toolset.create").exists()

    response = create(admin, servers=ids(alpha), tools=[{"server": str(beta.pk), "name": "search"}],
                      prefix_mode="never")
    assert response.status_code == 201, response.json()
    assert response.json()["exposed_tools"] == ["add", "echo", "search"]
    url = f"{URL}{response.json()['id']}/"
    grown = admin.client().patch(url, {"tools": [{"server": str(beta.pk), "name": "echo"}]}, format="json")
    assert grown.status_code == 400 and "echo (Alpha, Beta)" in grown.json()["prefix_mode"][0]
    assert admin.client().get(url).json()["tools"] == [{"server": str(beta.pk), "name": "search"}]  # unchanged

    both = admin.client().patch(url, {"prefix_mode": "always", "servers": ids(alpha, beta)}, format="json")
    assert both.status_code == 200 and both.json()["collisions"] == []
    assert "alpha__echo" in both.json()["exposed_tools"] and "beta__echo" in both.json()["exposed_tools"]
    back = admin.client().patch(url, {"prefix_mode": "never"}, format="json")
    assert back.status_code == 400 and "echo (Alpha, Beta)" in back.json()["prefix_mode"][0]


def test_a_collision_that_arises_later_is_shown_and_served_prefixed(admin, alpha, beta):
    toolset_id = create(admin, servers=ids(alpha), tools=[{"server": str(beta.pk), "name": "search"}],
                        prefix_mode="never").json()["id"]
    add_tool(alpha, "search")
    data = admin.client().get(f"{URL}{toolset_id}/").json()
    assert data["collisions"] == [{"name": "search", "servers": [{"id": str(alpha.pk), "name": "Alpha"},
                                                                  {"id": str(beta.pk), "name": "Beta"}]}]
    assert data["exposed_tools"] == ["add", "alpha__search", "beta__search", "echo"]
    renamed = admin.client().patch(f"{URL}{toolset_id}/", {"name": "Renamed"}, format="json")
    assert renamed.status_code == 200  # only a change of mode or members must resolve it


# -- the list ----------------------------------------------------------------------------------------


def test_list_is_paginated_and_its_query_count_does_not_grow_with_toolsets(admin, alpha, beta):
    def listing() -> tuple[int, dict]:
        with CaptureQueriesContext(connection) as queries:
            response = admin.client().get(URL)
        assert response.status_code == 200
        return len(queries), response.json()

    create(admin, name="t0", servers=ids(alpha))
    create(admin, name="t1", tools=[{"server": str(beta.pk), "name": "echo"}], prefix_mode="never")
    few, first = listing()
    for i in range(2, 10):
        servers = server_create(workspace=admin.workspace, actor=admin.user, name=f"s{i}", base_url=PUBLIC_URL)
        add_tool(servers, "echo")
        create(admin, name=f"t{i}", servers=[str(servers.pk), str(alpha.pk)],
               tools=[{"server": str(beta.pk), "name": "search"}])
    many, everything = listing()
    assert many == few
    assert first["count"] == 2 and everything["count"] == 10
    rows = {row["name"]: row for row in everything["results"]}
    assert rows["t1"]["exposed_tools"] == ["echo"]
    assert rows["t5"]["exposed_tools"] == ["alpha__add", "alpha__echo", "beta__search", "s5__echo"]
    page = admin.client().get(URL, {"limit": 3, "offset": 3}).json()
    assert [row["name"] for row in page["results"]] == ["t3", "t4", "t5"]
    assert admin.client().get(URL, {"limit": 0}).status_code == 400


@pytest.mark.django_db(transaction=True)
def test_the_list_serves_what_the_gateway_serves(admin, alpha, beta, settings):
    """``served_many`` (one page, fixed queries) against ``served_catalog.view_of`` (the gateway)."""
    settings.EXTERNAL_MCP_TOOL_NAME_MAX_CHARS = 40
    add_tool(alpha, "a tool/with odd characters")
    add_tool(alpha, "refused", ToolState.REFUSED)
    add_tool(beta, "gone", ToolState.REMOVED)
    add_tool(beta, "add", ToolState.CHANGED)
    add_tool(beta, "lookup_customer_by_email_address_and_more")
    off = make_server(admin, "Off")
    add_tool(off, "echo")
    ExternalMcpServer.objects.filter(pk=off.pk).update(enabled=False, status=ServerStatus.DISABLED)
    echo = [{"server": str(beta.pk), "name": "echo"}]
    cases = [
        {"servers": ids(alpha, beta, off)},
        {"servers": ids(alpha), "tools": echo + [{"server": str(alpha.pk), "name": "add"}]},
        {"servers": ids(alpha), "tools": [{"server": str(beta.pk), "name": "search"}], "prefix_mode": "never"},
        {"tools": echo + [{"server": str(beta.pk), "name": "add"}], "prefix_mode": "never"},
        {},
    ]
    made = [toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name=f"case {i}", **case)
            for i, case in enumerate(cases)]
    add_tool(beta, "search_more")
    add_tool(alpha, "search_more")
    Toolset.objects.filter(pk=made[1].pk).update(prefix_mode="never")  # collisions the write never saw
    made[2].servers.add(off)
    page = list(Toolset.objects.prefetch_related("servers", "tools").order_by("name"))
    bulk = toolsets.served_many(page)
    for toolset in page:
        view = served_catalog.view_of(toolset.workspace_id, toolset.pk)
        assert bulk[toolset.pk].exposed_tools == [tool["name"] for tool in view.tools], toolset.name
        assert [c.name for c in bulk[toolset.pk].collisions] == view.collisions, toolset.name
        assert bulk[toolset.pk] == toolsets.served_view(toolset), toolset.name
    assert bulk[made[1].pk].collisions[0].text() == "echo (Alpha, Beta)"
    assert "off__echo" not in bulk[made[0].pk].exposed_tools and bulk[made[4].pk].exposed_tools == []
