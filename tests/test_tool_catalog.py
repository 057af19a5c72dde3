from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from external_mcp import catalog, services
from external_mcp.models import AuditEvent, ExternalMcpTool, Notification


def tool(name: str, description: str = "d", **extra) -> dict:
    return {"name": name, "description": description, "inputSchema": {"type": "object"}, **extra}


@pytest.fixture
def server(admin, member):
    return services.server_create(workspace=admin.workspace, actor=admin.user, name="cat",
                                  base_url="https://93.184.215.14/mcp")


def states(server) -> dict[str, str]:
    return dict(ExternalMcpTool.objects.filter(server=server).values_list("name", "state"))


def test_first_discovery_is_pending_and_hash_is_canonical(server):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("b")])
    assert states(server) == {"a": "pending", "b": "pending"}
    a = ExternalMcpTool.objects.get(name="a")
    assert a.definition_hash == catalog.definition_hash({"inputSchema": {"type": "object"}, "description": "d",
                                                         "name": "a"})
    assert len(a.definition_hash) == 64


def test_approve_some_then_all(server, admin):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("b")])
    assert catalog.tools_approve(server=server, actor=admin.user, names=["a"]) == ["a"]
    assert states(server) == {"a": "approved", "b": "pending"}
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    assert states(server) == {"a": "approved", "b": "approved"}
    assert AuditEvent.objects.filter(action="tools.approve").count() == 2


def test_changed_definition_is_quarantined_and_admins_notified_once(server, admin, member):
    catalog.catalog_sync(server=server, tools=[tool("a")])
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    changed = catalog.catalog_sync(server=server, tools=[tool("a", "now exfiltrates your data")])
    assert [t.name for t in changed] == ["a"]
    a = ExternalMcpTool.objects.get(name="a")
    assert a.state == "changed"
    assert a.approved_definition["description"] == "d"
    assert a.definition["description"] == "now exfiltrates your data"
    assert catalog.catalog_sync(server=server, tools=[tool("a", "now exfiltrates your data")]) == []
    notes = Notification.objects.filter(kind="tool.changed")
    assert [n.user.username for n in notes] == ["alice"]
    catalog.tools_approve(server=server, actor=admin.user, names=["a"])
    assert states(server) == {"a": "approved"}


@pytest.mark.parametrize("extra", [{"_meta": {"ui": {"resourceUri": "ui://x"}}}, {"icons": [{"src": "https://i/x.png"}]},
                                   {"execution": {"taskSupport": "required"}}], ids=["_meta", "icons", "execution"])
def test_every_key_agents_receive_is_pinned(server, admin, extra):
    catalog.catalog_sync(server=server, tools=[tool("a")])
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    assert [t.name for t in catalog.catalog_sync(server=server, tools=[tool("a", **extra)])] == ["a"]
    a = ExternalMcpTool.objects.get(name="a")
    assert a.state == "changed" and a.definition == {**tool("a"), **extra}


@pytest.mark.parametrize(("extra", "reason"), [({"_meta": ["x"]}, "_meta is a JSON array, not a JSON object."),
                                               ({"icons": {"src": "x"}}, "icons is a JSON object, not a JSON array."),
                                               ({"execution": "x"}, "execution is a JSON string, not a JSON object.")])
def test_pinned_keys_of_the_wrong_type_are_refused(server, extra, reason):
    catalog.catalog_sync(server=server, tools=[tool("a", **extra)])
    a = ExternalMcpTool.objects.get(name="a")
    assert (a.state, a.refusal_reason) == ("refused", reason)


def test_reverting_to_the_approved_definition_unquarantines(server, admin):
    catalog.catalog_sync(server=server, tools=[tool("a")])
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    catalog.catalog_sync(server=server, tools=[tool("a", "other")])
    catalog.catalog_sync(server=server, tools=[tool("a")])
    assert states(server) == {"a": "approved"}


def test_pending_tool_that_changes_stays_pending(server):
    catalog.catalog_sync(server=server, tools=[tool("a")])
    catalog.catalog_sync(server=server, tools=[tool("a", "x")])
    assert states(server) == {"a": "pending"}


def test_removed_and_reappearing_tools(server, admin):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("b"), tool("c")])
    catalog.tools_approve(server=server, actor=admin.user, names=["a", "b"])
    catalog.catalog_sync(server=server, tools=[])
    assert set(states(server).values()) == {"removed"}
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("b", "different"), tool("c")])
    assert states(server) == {"a": "approved", "b": "changed", "c": "pending"}


def test_disable_and_approve_errors(server, admin):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("gone")])
    catalog.catalog_sync(server=server, tools=[tool("a")])
    assert catalog.tools_disable(server=server, actor=admin.user, names=["a"]) == ["a"]
    with pytest.raises(ValidationError, match="Unknown tool"):
        catalog.tools_approve(server=server, actor=admin.user, names=["nope"])
    with pytest.raises(ValidationError, match="Removed"):
        catalog.tools_approve(server=server, actor=admin.user, names=["gone"])
    with pytest.raises(ValidationError, match="Give tool names"):
        catalog.tools_approve(server=server, actor=admin.user, names=[])


def test_duplicate_names_in_one_listing_count_once(server):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("a", "dup")])
    assert ExternalMcpTool.objects.filter(server=server).count() == 1


def test_tools_api_lists_and_approves(server, admin, member, outsider, flag_on):
    catalog.catalog_sync(server=server, tools=[tool("a"), tool("b")])
    base = f"/api/v1/external-mcp/servers/{server.pk}/tools/"
    assert [t["name"] for t in member.client().get(base).json()] == ["a", "b"]
    assert outsider.client().get(base).status_code == 404
    assert member.client().post(f"{base}approve/", {"all": True}, format="json").status_code == 403
    bad = admin.client().post(f"{base}approve/", {}, format="json")
    assert bad.status_code == 400 and "names" in bad.json()
    unknown = admin.client().post(f"{base}approve/", {"names": ["zzz"]}, format="json")
    assert unknown.status_code == 400 and "zzz" in unknown.json()["names"][0]
    ok = admin.client().post(f"{base}approve/", {"names": ["b"]}, format="json")
    assert {t["name"]: t["state"] for t in ok.json()} == {"a": "pending", "b": "approved"}
