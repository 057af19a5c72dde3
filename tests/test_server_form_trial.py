""""Test connection" on the add and edit forms: the full check of the settings as typed, against real
MCP peers on 127.0.0.1, with nothing stored; the URL policy, permissions and the rate limit still apply."""

from __future__ import annotations

from contextlib import closing

from external_mcp import services, trial
from external_mcp.models import (
    AuditEvent,
    ExternalMcpCredential,
    ExternalMcpServer,
    ExternalMcpTool,
    HealthCheck,
    Notification,
    StatusChange,
)
from tests import mcp_peers

HTMX = {"HTTP_HX_REQUEST": "true"}
ADD_TEST = "/servers/new/test/"
CANARY = "canary-Trial-9-secret"


def form(**data) -> dict:
    return {"name": "srv", "base_url": "", "description": "", "tags": "", "auth_type": "none", **data}


def html(response) -> str:
    return response.content.decode()


def rows() -> dict[str, int]:
    """Everything a saved test would leave behind."""
    return {model.__name__: model.objects.count() for model in
            (ExternalMcpServer, ExternalMcpCredential, ExternalMcpTool, HealthCheck, StatusChange, Notification,
             AuditEvent)}


def edit_test_url(server) -> str:
    return f"/servers/{server.pk}/edit/test/"


def refused_url() -> tuple[object, str]:
    sock = mcp_peers.reserve_port()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


def test_add_form_test_succeeds_lists_the_tools_and_stores_nothing(admin_web, loopback):
    before = rows()
    with mcp_peers.default_peer() as peer:
        response = admin_web.post(ADD_TEST, form(base_url=peer.url), **HTMX)
    page = html(response)
    assert response.status_code == 200 and "<html" not in page
    assert 'id="trial-outcome"' in page and 'data-ok="true"' in page and "protocol version" in page
    assert "<code class=\"break\">echo</code>" in page and "Nothing was saved" in page
    assert 'id="save-warning"' in page and "The last test failed" not in page
    assert rows() == before


def test_add_form_test_of_a_wrong_url_fails_warns_near_save_and_stores_nothing(admin_web, loopback):
    before = rows()
    sock, url = refused_url()
    with closing(sock):
        response = admin_web.post(ADD_TEST, form(base_url=url), **HTMX)
    page = html(response)
    assert response.status_code == 200
    assert 'data-ok="false"' in page and 'data-error-class="connect"' in page and "Connection refused" in page
    assert 'hx-swap-oob="outerHTML"' in page
    assert "The last test failed: Connection refused; the server will show Down until it answers" in page
    assert rows() == before


def test_without_htmx_the_whole_form_comes_back_with_the_result(admin_web, loopback):
    sock, url = refused_url()
    with closing(sock):
        response = admin_web.post(ADD_TEST, form(name="kept name", base_url=url))
    page = html(response)
    assert response.status_code == 200 and "<html" in page
    assert 'value="kept name"' in page and 'id="trial-outcome"' in page
    assert "The last test failed: Connection refused" in page
    assert ExternalMcpServer.objects.count() == 0


def test_typed_secret_is_sent_and_never_stored_or_echoed(admin_web, loopback):
    before = rows()
    with mcp_peers.bearer_peer(CANARY) as peer:
        good = admin_web.post(ADD_TEST, form(base_url=peer.url, auth_type="bearer", **{"cred-token": CANARY}), **HTMX)
        wrong = admin_web.post(ADD_TEST, form(base_url=peer.url, auth_type="bearer", **{"cred-token": "nope"}),
                               **HTMX)
    assert 'data-ok="true"' in html(good), html(good)
    assert 'data-error-class="auth"' in html(wrong)
    assert CANARY not in html(good) + html(wrong)
    assert rows() == before


def test_per_user_mode_is_tested_with_the_secret_typed(admin_web, loopback):
    with mcp_peers.bearer_peer(CANARY) as peer:
        response = admin_web.post(ADD_TEST, form(base_url=peer.url, auth_type="bearer", credential_mode="per_user",
                                                 **{"cred-token": CANARY}), **HTMX)
    assert 'data-ok="true"' in html(response), html(response)


def test_edit_form_blank_secret_uses_the_stored_one_and_changes_nothing(admin_web, admin, loopback):
    with mcp_peers.bearer_peer(CANARY) as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="b", base_url=peer.url,
                                        auth_type="bearer", credentials={"token": CANARY})
        before, status = rows(), server.status
        data = form(name="b", base_url=peer.url, auth_type="bearer")
        kept = admin_web.post(edit_test_url(server), data, **HTMX)
        typed = admin_web.post(edit_test_url(server), {**data, "cred-token": "typed-wrong"}, **HTMX)
    assert 'data-ok="true"' in html(kept), html(kept)
    assert 'data-error-class="auth"' in html(typed)
    assert rows() == before
    server.refresh_from_db()
    assert server.status == status and server.last_checked_at is None


def test_edit_form_of_a_per_user_server_asks_for_a_secret_to_test_with(admin_web, admin, loopback):
    with mcp_peers.bearer_peer(CANARY) as peer:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="p", base_url=peer.url,
                                        auth_type="bearer", credential_mode="per_user")
        data = form(name="p", base_url=peer.url, auth_type="bearer", credential_mode="per_user")
        blank = admin_web.post(edit_test_url(server), data, **HTMX)
        typed = admin_web.post(edit_test_url(server), {**data, "cred-token": CANARY}, **HTMX)
    assert 'href="#id_cred-token"' in html(blank)
    assert 'data-ok="true"' in html(typed), html(typed)


def test_edit_form_never_sends_the_stored_secret_to_another_origin(admin_web, admin, loopback):
    with mcp_peers.bearer_peer(CANARY) as home, mcp_peers.bearer_peer(CANARY) as elsewhere:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="b", base_url=home.url,
                                        auth_type="bearer", credentials={"token": CANARY})
        response = admin_web.post(edit_test_url(server), form(name="b", base_url=elsewhere.url, auth_type="bearer"),
                                  **HTMX)
        sent = list(elsewhere.requests)
    page = html(response)
    assert "enter the secret again" in page and 'data-error-class="invalid"' in page
    assert sent == []


def test_invalid_values_show_field_errors_instead_of_a_test(admin_web, loopback):
    response = admin_web.post(ADD_TEST, form(name="", base_url="ftp://example.com/mcp", auth_type="bearer"), **HTMX)
    page = html(response)
    assert response.status_code == 200 and 'data-error-class="invalid"' in page
    for field_id in ("id_name", "id_base_url", "id_cred-token"):
        assert f'href="#{field_id}"' in page, field_id
    full = admin_web.post(ADD_TEST, form(name="", base_url="ftp://example.com/mcp"))
    assert full.status_code == 400 and 'id="id_name_error"' in html(full) and 'id="id_base_url_error"' in html(full)


def test_the_url_policy_still_applies_so_the_test_is_no_ssrf_probe(admin_web, settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    with mcp_peers.default_peer() as peer:  # loopback is not allowed by the default policy
        response = admin_web.post(ADD_TEST, form(base_url=peer.url), **HTMX)
        sent = list(peer.requests)
    page = html(response)
    assert 'href="#id_base_url"' in page and sent == []
    metadata = admin_web.post(ADD_TEST, form(base_url="http://169.254.169.254/latest/"), **HTMX)
    assert 'href="#id_base_url"' in html(metadata)


def test_oauth_sign_in_says_plainly_it_needs_saving_first(admin_web, loopback):
    response = admin_web.post(ADD_TEST, form(base_url="https://93.184.215.14/mcp", auth_type="oauth2"), **HTMX)
    page = html(response)
    assert 'data-error-class="untestable"' in page and "cannot be tested before saving" in page


def test_tests_are_rate_limited_per_user(admin_web, settings):
    data = form(base_url="ftp://example.com/mcp")
    for _ in range(trial.TRIALS_PER_MINUTE):
        assert "Too many tests" not in html(admin_web.post(ADD_TEST, data, **HTMX))
    assert "Too many tests" in html(admin_web.post(ADD_TEST, data, **HTMX))
    assert admin_web.post(ADD_TEST, data).status_code == 429


def test_member_gets_403(member_web, admin):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="x",
                                    base_url="https://93.184.215.14/mcp")
    assert member_web.post(ADD_TEST, form(base_url="https://93.184.215.14/mcp"), **HTMX).status_code == 403
    assert member_web.post(edit_test_url(server), form(base_url="https://93.184.215.14/mcp"),
                           **HTMX).status_code == 403


def test_outsider_gets_404_for_another_workspaces_server(outsider_web, admin):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="x",
                                    base_url="https://93.184.215.14/mcp")
    response = outsider_web.post(edit_test_url(server), form(base_url="https://93.184.215.14/mcp"), **HTMX)
    assert response.status_code == 404


def test_get_is_not_allowed(admin_web):
    assert admin_web.get(ADD_TEST).status_code == 405


def test_forms_have_the_button_and_the_add_form_no_dead_one(admin_web, admin):
    add = html(admin_web.get("/servers/new/"))
    assert 'hx-post="/servers/new/test/"' in add and 'hx-encoding="multipart/form-data"' in add
    assert "disabled>Test connection" not in add and 'id="save-warning"' in add
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="x",
                                    base_url="https://93.184.215.14/mcp")
    edit = html(admin_web.get(f"/servers/{server.pk}/edit/"))
    assert f'hx-post="/servers/{server.pk}/edit/test/"' in edit and "Test these settings" in edit
