"""Toolset pages: the list in the navigation, the form with servers and tools grouped by server,
the page with its endpoint, served tools, collisions and agent configurations, deletion with
confirmation; members see them read-only, anyone else gets a 404."""

from __future__ import annotations

import json
import re
from html import unescape

import pytest

from external_mcp import toolsets
from external_mcp.models import AuditEvent, Toolset
from tests.test_toolsets import add_tool, make_server
from tests.test_ui_pages import InlineCode


def html(response) -> str:
    return response.content.decode()


@pytest.fixture
def members(admin, flag_on):
    alpha = make_server(admin, "Alpha")
    beta = make_server(admin, "Beta")
    for server, names in ((alpha, ("add", "echo")), (beta, ("echo", "search"))):
        for name in names:
            add_tool(server, name)
    add_tool(alpha, "draft", "pending")
    return alpha, beta


@pytest.fixture
def toolset(admin, members) -> Toolset:
    alpha, beta = members
    return toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name="Dev tools",
                                   description="For the dev agent", servers=[str(alpha.pk)],
                                   tools=[{"server": str(beta.pk), "name": "search"}])


def urls(toolset: Toolset) -> dict[str, str]:
    base = f"/toolsets/{toolset.pk}/"
    return {"detail": base, "edit": base + "edit/", "delete": base + "delete/"}


def test_the_navigation_leads_to_the_list_with_mode_members_and_endpoint(admin_web, toolset):
    assert 'href="/toolsets/"' in html(admin_web.get("/servers/"))
    page = html(admin_web.get("/toolsets/"))
    row = page[page.index('data-toolset-name="Dev tools"'):]
    row = row[:row.index("</tr>")]
    assert "Always prefixed" in row and "1 server, 1 tool" in row
    assert f"http://testserver/api/v1/external-mcp/toolsets/{toolset.pk}/mcp" in row
    assert urls(toolset)["edit"] in row and urls(toolset)["delete"] in row and "New toolset" in page


def test_the_form_offers_servers_and_approved_tools_grouped_by_server(admin_web, members):
    alpha, beta = members
    page = html(admin_web.get("/toolsets/new/"))
    assert f'name="servers" value="{alpha.pk}"' in page and f'name="servers" value="{beta.pk}"' in page
    beta_group = page[page.index("<legend>Beta</legend>"):]
    beta_group = beta_group[:beta_group.index("</fieldset>")]
    assert f'value="{beta.pk}:search"' in beta_group and f'value="{beta.pk}:echo"' in beta_group
    assert "draft" not in page  # pending: not offered


def test_an_admin_creates_edits_and_deletes_a_toolset(admin_web, admin, members):
    alpha, beta = members
    response = admin_web.post("/toolsets/new/", {"name": "Dev tools", "description": "", "prefix_mode": "always",
                                                 "servers": [str(alpha.pk)], "tools": [f"{beta.pk}:search"]})
    toolset = Toolset.objects.get(name="Dev tools")
    assert response.status_code == 302 and response["Location"] == urls(toolset)["detail"]
    assert list(toolset.servers.all()) == [alpha] and [t.name for t in toolset.tools.all()] == ["search"]

    edit = html(admin_web.get(urls(toolset)["edit"]))
    assert re.search(rf'value="{alpha.pk}" id="server-\d+" checked', edit)
    assert re.search(rf'value="{beta.pk}:search" id="tool-\d+-\d+" checked', edit)
    collide = admin_web.post(urls(toolset)["edit"], {"name": "Dev tools", "prefix_mode": "never",
                                                      "servers": [str(alpha.pk), str(beta.pk)]})
    page = html(collide)
    assert collide.status_code == 400 and 'id="id_prefix_mode_error"' in page and "echo (Alpha, Beta)" in page
    saved = admin_web.post(urls(toolset)["edit"], {"name": "Renamed", "prefix_mode": "never",
                                                    "servers": [str(alpha.pk)], "tools": [f"{beta.pk}:search"]})
    assert saved.status_code == 302
    toolset.refresh_from_db()
    assert (toolset.name, toolset.prefix_mode) == ("Renamed", "never")

    confirm = html(admin_web.get(urls(toolset)["delete"]))
    assert "Delete Renamed?" in confirm and f"/toolsets/{toolset.pk}/mcp" in confirm
    assert admin_web.post(urls(toolset)["delete"])["Location"] == "/toolsets/"
    assert not Toolset.objects.exists()
    assert [e.action for e in AuditEvent.objects.filter(action__startswith="toolset").order_by("at")] == [
        "toolset.create", "toolset.update", "toolset.delete"]


def test_form_errors_are_shown_next_to_their_field(admin_web, toolset):
    page = html(admin_web.post("/toolsets/new/", {"name": "dev TOOLS", "prefix_mode": "always"}))
    assert 'id="id_name_error"' in page and "already exists" in page
    page = html(admin_web.post("/toolsets/new/", {"name": "x", "prefix_mode": "sometimes"}))
    assert 'id="id_prefix_mode_error"' in page


def test_the_page_shows_endpoint_served_tools_and_a_configuration_per_client(admin_web, toolset):
    page = html(admin_web.get(urls(toolset)["detail"]))
    url = f"http://testserver/api/v1/external-mcp/toolsets/{toolset.pk}/mcp"
    assert f'<code class="endpoint-url">{url}</code>' in page
    served = re.findall(r"<li><code>([^<]+)</code></li>", page[page.index('class="exposed-tools"'):])
    assert served == ["alpha__add", "alpha__echo", "beta__search"]
    blocks = [unescape(b) for b in re.findall(r'<code class="language-\w+">(.*?)</code>', page, re.DOTALL)]
    assert len(blocks) == 5
    assert json.loads(blocks[0])["mcpServers"]["dev-tools"]["args"][2] == url
    assert json.loads(blocks[2])["mcpServers"]["dev-tools"]["url"] == url
    assert 'id="collision-warning"' not in page and "Edit" in page


def test_a_collision_is_a_warning_on_the_page(admin_web, toolset, members):
    alpha, beta = members
    Toolset.objects.filter(pk=toolset.pk).update(prefix_mode="never")
    toolset.servers.add(beta)
    page = html(admin_web.get(urls(toolset)["detail"]))
    warning = page[page.index('id="collision-warning"'):]
    assert "<code>echo</code> (Alpha, Beta)" in warning[:warning.index("</div>")]


def test_members_see_read_only_pages(member_web, toolset):
    listing = html(member_web.get("/toolsets/"))
    assert "Dev tools" in listing and urls(toolset)["edit"] not in listing and "New toolset" not in listing
    detail = member_web.get(urls(toolset)["detail"])
    assert detail.status_code == 200 and urls(toolset)["edit"] not in html(detail)
    assert "alpha__echo" in html(detail)
    for url in ("/toolsets/new/", urls(toolset)["edit"], urls(toolset)["delete"]):
        assert member_web.get(url).status_code == 403, url
        assert member_web.post(url, {"name": "x", "prefix_mode": "always"}).status_code == 403, url
    assert Toolset.objects.get().name == "Dev tools"


def test_outsiders_get_404(outsider_web, toolset):
    for url in urls(toolset).values():
        assert outsider_web.get(url).status_code == 404, url
        assert outsider_web.post(url).status_code in (404, 405), url
    assert "Dev tools" not in html(outsider_web.get("/toolsets/"))
    assert Toolset.objects.filter(pk=toolset.pk).exists()


def test_the_pages_need_the_flag(client, admin):
    toolset = toolsets.toolset_create(workspace=admin.workspace, actor=admin.user, name="Dark")
    client.force_login(admin.user)
    for url in ["/toolsets/", "/toolsets/new/", *urls(toolset).values()]:
        assert client.get(url).status_code == 404, url
    assert 'href="/toolsets/"' not in html(client.get("/"))


def test_toolset_pages_keep_the_strict_csp(admin_web, toolset):
    for url in ["/toolsets/", "/toolsets/new/", *urls(toolset).values()]:
        response = admin_web.get(url)
        assert response.status_code == 200, url
        parser = InlineCode()
        parser.feed(html(response))
        assert parser.problems == [], (url, parser.problems)


def test_the_api_key_page_points_at_the_workspace_endpoint_first(admin_web, admin, toolset):
    response = admin_web.post("/api-keys/", {"name": "laptop", "workspace": str(admin.workspace.pk)}, follow=True)
    page = html(response)
    config_text = re.search(r'<pre class="snippet" id="mcp-config">(.*?)</pre>', page, re.S).group(1)
    config = json.loads(unescape(config_text))
    assert list(config["mcpServers"]) == ["twinmcp-acme"]
    assert config["mcpServers"]["twinmcp-acme"]["url"] == "http://testserver/api/v1/external-mcp/mcp"
    assert "&lt;prefix&gt;__&lt;tool&gt;" in page
    others = page[page.index('id="other-endpoints"'):]
    assert f"/api/v1/external-mcp/toolsets/{toolset.pk}/mcp" in others and "Toolset Dev tools" in others
    assert page.index("/api/v1/external-mcp/mcp") < page.index(f"/toolsets/{toolset.pk}/mcp")


def test_an_admin_of_two_workspaces_chooses_where_to_create(admin_web, admin, outsider, members):
    from twinmcp import services as core_services

    core_services.member_add(workspace=outsider.workspace, user=admin.user, role="admin")
    theirs = make_server(outsider, "Theirs")
    add_tool(theirs, "lookup")
    page = html(admin_web.get("/toolsets/new/"))
    assert 'id="workspace-choice"' in page and "Alpha" in page and "Theirs" not in page
    page = html(admin_web.get(f"/toolsets/new/?workspace={outsider.workspace.pk}"))
    assert f'value="{theirs.pk}:lookup"' in page and "Alpha" not in page
    response = admin_web.post("/toolsets/new/", {"workspace": str(outsider.workspace.pk), "name": "Global",
                                                 "prefix_mode": "always", "tools": [f"{theirs.pk}:lookup"]})
    assert response.status_code == 302
    assert Toolset.objects.get(name="Global").workspace == outsider.workspace
    alpha = members[0]
    refused = admin_web.post("/toolsets/new/", {"workspace": str(outsider.workspace.pk), "name": "Mixed",
                                                "prefix_mode": "always", "servers": [str(alpha.pk)]})
    assert refused.status_code == 400 and 'id="id_servers_error"' in html(refused)
