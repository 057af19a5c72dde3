"""Single tools switched off and on by an admin (API and server page): effective on the next call
on both endpoints, audited, refused to agents with the reason; members and outsiders cannot."""

from __future__ import annotations

import asyncio

import pytest
from django.test import Client
from mcp.shared.exceptions import MCPError
from rest_framework.test import APIClient

from external_mcp.choices import ToolState
from external_mcp.models import AuditEvent, ExternalMcpTool
from tests import mcp_peers
from tests.gateway import agent, proxy_url, register

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]

URL = "/api/v1/external-mcp/servers/{}/tools/{}/"


def api(actor) -> APIClient:
    """The actor's API client, on the host the live-gateway settings allow."""
    client = APIClient(HTTP_HOST="127.0.0.1")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {actor.raw_key}")
    return client


def states(server) -> dict[str, str]:
    return dict(ExternalMcpTool.objects.filter(server=server).values_list("name", "state"))


def test_a_disabled_tool_is_refused_at_once_on_both_endpoints_and_enabled_again(admin, member, gateway):
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, name="up")

        async def session() -> list[str]:
            seen: list[str] = []
            async with agent(proxy_url(gateway, server), member.raw_key) as direct, \
                    agent(f"{gateway.base}/api/v1/external-mcp/mcp", member.raw_key) as workspace:
                seen.append((await direct.call_tool("echo", {"text": "before"})).content[0].text)
                off = await asyncio.to_thread(api(admin).post, URL.format(server.pk, "disable"),
                                              {"names": ["echo"]}, format="json")
                assert off.status_code == 200
                for client, name in ((direct, "echo"), (workspace, "up__echo")):
                    with pytest.raises(MCPError) as refused:
                        await client.call_tool(name, {"text": "during"})
                    seen.append(refused.value.error.message)
                back = await asyncio.to_thread(api(admin).post, URL.format(server.pk, "enable"),
                                               {"names": ["echo"]}, format="json")
                assert back.status_code == 200
                seen.append((await direct.call_tool("echo", {"text": "after"})).content[0].text)
            return seen

        seen = asyncio.run(session())
    assert seen[0] == "before" and seen[-1] == "after"
    assert all("disabled by a workspace admin" in message for message in seen[1:3])
    assert states(server)["echo"] == ToolState.APPROVED
    actions = list(AuditEvent.objects.filter(server=server).values_list("action", "changes"))
    assert ("tools.disable", {"tools": ["echo"]}) in actions and ("tools.enable", {"tools": ["echo"]}) in actions


def test_enabling_a_tool_whose_definition_changed_quarantines_it(admin):
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, name="up")
    client = api(admin)
    assert client.post(URL.format(server.pk, "disable"), {"names": ["echo"]}, format="json").status_code == 200
    ExternalMcpTool.objects.filter(server=server, name="echo").update(definition_hash="0" * 64)
    not_disabled = client.post(URL.format(server.pk, "enable"), {"names": ["add"]}, format="json")
    unknown = client.post(URL.format(server.pk, "disable"), {"names": ["nope"]}, format="json")
    empty = client.post(URL.format(server.pk, "disable"), {"names": []}, format="json")
    enabled = client.post(URL.format(server.pk, "enable"), {"names": ["echo"]}, format="json")
    assert not_disabled.status_code == 400 and "Not disabled: add" in str(not_disabled.json()["names"])
    assert unknown.status_code == 400 and "Unknown tool" in str(unknown.json()["names"])
    assert empty.status_code == 400 and "names" in empty.json()
    assert enabled.status_code == 200 and states(server)["echo"] == ToolState.CHANGED


def test_only_admins_switch_tools_and_the_page_offers_the_buttons(admin, member, outsider):
    admin_web = Client(HTTP_HOST="127.0.0.1")
    admin_web.force_login(admin.user)
    with mcp_peers.default_peer() as peer:
        server = register(admin, peer, name="up")
    assert api(member).post(URL.format(server.pk, "disable"), {"names": ["echo"]}, format="json").status_code == 403
    assert api(outsider).post(URL.format(server.pk, "disable"), {"names": ["echo"]},
                                  format="json").status_code == 404
    page = admin_web.get(f"/servers/{server.pk}/").content.decode()
    assert 'aria-label="Disable echo"' in page
    off = admin_web.post(f"/servers/{server.pk}/tools/disable/", {"names": ["echo"]}, HTTP_HX_REQUEST="true")
    assert off.status_code == 200 and "Disabled: echo." in off.content.decode()
    assert 'aria-label="Enable echo"' in off.content.decode()
    back = admin_web.post(f"/servers/{server.pk}/tools/enable/", {"names": ["echo"]})
    assert back.status_code == 302 and states(server)["echo"] == ToolState.APPROVED
    assert admin_web.post(f"/servers/{server.pk}/tools/explode/", {"names": ["echo"]}).status_code == 404
