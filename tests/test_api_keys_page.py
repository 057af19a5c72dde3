"""The API keys page: creating is POST-redirect-GET (a reload makes no second key), the new raw key
is shown once and never stored in clear, revoking asks first; and the favicon."""

from __future__ import annotations

import re

from twinmcp.models import ApiKey
from twinmcp.show_once import SESSION_PREFIX


def html(response) -> str:
    return response.content.decode()


def test_create_redirects_then_shows_the_key_once_and_a_reload_makes_no_second_key(client, admin):
    client.force_login(admin.user)
    response = client.post("/api-keys/", {"name": "laptop", "workspace": str(admin.workspace.pk)})
    assert response.status_code == 302 and response["Location"] == "/api-keys/"
    assert ApiKey.objects.filter(name="laptop").count() == 1
    stored = [v for k, v in client.session.items() if k.startswith(SESSION_PREFIX)]
    first = client.get("/api-keys/")
    assert first.status_code == 200 and first["Cache-Control"] == "no-store"
    raw = re.search(r'<code id="new-key-value">(tmcp_[\w-]+)</code>', html(first)).group(1)
    assert raw.startswith(ApiKey.objects.get(name="laptop").prefix)
    assert f"Bearer {raw}" in html(first).replace("&quot;", '"')
    assert stored and all(raw not in value for value in stored)
    second = client.get("/api-keys/")
    assert raw not in html(second) and 'id="new-key-value"' not in html(second)
    assert ApiKey.objects.filter(user=admin.user).count() == 2  # the fixture's key and this one


def test_a_stashed_key_is_not_shown_to_another_user_of_the_session_store(client, admin, member):
    client.force_login(admin.user)
    client.post("/api-keys/", {"name": "mine", "workspace": str(admin.workspace.pk)})
    token = client.session[SESSION_PREFIX + "new-api-key"]
    client.force_login(member.user)
    session = client.session
    session[SESSION_PREFIX + "new-api-key"] = token
    session.save()
    assert 'id="new-key-value"' not in html(client.get("/api-keys/"))


def test_revoke_asks_for_confirmation_then_revokes(client, admin, member, outsider):
    client.force_login(admin.user)
    url = f"/api-keys/{admin.key.pk}/revoke/"
    assert f'href="{url}"' in html(client.get("/api-keys/"))
    confirm = client.get(url)
    assert confirm.status_code == 200 and "Revoke key" in html(confirm) and 'method="post"' in html(confirm)
    admin.key.refresh_from_db()
    assert admin.key.revoked_at is None
    assert client.post(url)["Location"] == "/api-keys/"
    admin.key.refresh_from_db()
    assert admin.key.revoked_at is not None
    assert client.get(url)["Location"] == "/api-keys/"


def test_nobody_confirms_or_revokes_another_users_key(client, admin, member, outsider):
    for who in (member, outsider):
        client.force_login(who.user)
        assert client.get(f"/api-keys/{admin.key.pk}/revoke/").status_code == 404
        assert client.post(f"/api-keys/{admin.key.pk}/revoke/").status_code == 404
    admin.key.refresh_from_db()
    assert admin.key.revoked_at is None


def test_pages_link_the_svg_favicon_and_favicon_ico_redirects_to_it(client, admin):
    client.force_login(admin.user)
    page = html(client.get("/api-keys/"))
    icon = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page).group(1)
    assert "favicon" in icon and icon.endswith(".svg")
    response = client.get("/favicon.ico")
    assert response.status_code == 302 and response["Location"] == icon
    assert client.post("/favicon.ico").status_code == 405
