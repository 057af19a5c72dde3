from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone
from rest_framework.test import APIClient

from twinmcp import services
from twinmcp.apikeys import generate_key, hash_key
from twinmcp.models import ApiKey

URL = "/api/v1/api-keys/"


def get(raw_header: str | None):
    client = APIClient()
    if raw_header is not None:
        client.credentials(HTTP_AUTHORIZATION=raw_header)
    return client.get(URL)


def test_valid_key_lists_own_keys_without_secrets(admin, member):
    response = admin.client().get(URL)
    assert response.status_code == 200
    body = response.json()
    assert [k["id"] for k in body] == [str(admin.key.id)]
    assert admin.raw_key not in response.content.decode()
    assert admin.key.key_hash not in response.content.decode()
    assert body[0]["prefix"] == admin.raw_key[:12]


def test_only_the_hash_is_stored(admin):
    stored = ApiKey.objects.get(pk=admin.key.pk)
    assert stored.key_hash == hash_key(admin.raw_key)
    assert admin.raw_key not in [stored.prefix, stored.name, stored.key_hash]
    assert len(admin.raw_key) == 48 and admin.raw_key.startswith("tmcp_")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer tmcp_short",
        "Bearer sk_" + "a" * 43,
        "Bearer tmcp_" + "!" * 43,
        "Token tmcp_" + "a" * 43,
    ],
)
def test_malformed_header_is_401_json(db, header):
    response = get(header)
    assert response.status_code == 401
    assert "detail" in response.json()
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_missing_header_is_401(db):
    response = get(None)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_unknown_key_is_401(db):
    response = get(f"Bearer {generate_key().raw}")
    assert response.status_code == 401
    assert response.json()["detail"] == "Unknown API key."


def test_revoked_key_is_401(admin):
    admin.client().delete(f"{URL}{admin.key.id}/")
    response = admin.client().get(URL)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_expired_key_is_401(admin):
    key, raw = services.api_key_create(
        user=admin.user, workspace=admin.workspace, expires_at=timezone.now() + timedelta(hours=1)
    )
    assert get(f"Bearer {raw}").status_code == 200
    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        response = get(f"Bearer {raw}")
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_removed_member_key_is_401(member):
    services.member_remove(workspace=member.workspace, user=member.user)
    response = member.client().get(URL)
    assert response.status_code == 401
    assert "no longer a member" in response.json()["detail"]


def test_inactive_user_key_is_401(member):
    member.user.is_active = False
    member.user.save()
    assert member.client().get(URL).status_code == 401


def test_create_returns_key_once_and_it_works(admin):
    response = admin.client().post(URL, {"name": "ci"}, format="json")
    assert response.status_code == 201
    raw = response.json()["key"]
    assert raw.startswith("tmcp_")
    assert response.json()["workspace"] == "acme"
    listing = get(f"Bearer {raw}").json()
    assert all("key" not in item for item in listing)
    assert {item["name"] for item in listing} == {"alice-key", "ci"}


def test_create_in_a_workspace_you_do_not_belong_to_is_400(admin, outsider):
    response = admin.client().post(URL, {"workspace": "globex"}, format="json")
    assert response.status_code == 400
    assert "workspace" in response.json()


def test_create_with_past_expiry_is_400(admin):
    response = admin.client().post(URL, {"expires_at": "2001-01-01T00:00:00Z"}, format="json")
    assert response.status_code == 400
    assert "expires_at" in response.json()


def test_create_with_bad_field_types_is_400(admin):
    response = admin.client().post(URL, {"expires_at": "soon", "name": "x" * 300}, format="json")
    assert response.status_code == 400
    assert set(response.json()) == {"expires_at", "name"}


def test_session_user_with_one_workspace_gets_it_by_default(client, admin):
    client.force_login(admin.user)
    response = client.post(URL, {"name": "web"}, content_type="application/json")
    assert response.status_code == 201
    assert response.json()["workspace"] == "acme"


def test_session_user_in_two_workspaces_must_choose(client, admin, other_workspace):
    services.member_add(workspace=other_workspace, user=admin.user, role="member")
    client.force_login(admin.user)
    response = client.post(URL, {}, content_type="application/json")
    assert response.status_code == 400
    assert "several workspaces" in response.json()["workspace"][0]
    response = client.post(URL, {"workspace": "globex"}, content_type="application/json")
    assert response.json()["workspace"] == "globex"


def test_session_user_without_workspace_cannot_create(client, django_user_model):
    user = django_user_model.objects.create_user(username="loner", password="x" * 12)
    client.force_login(user)
    response = client.post(URL, {}, content_type="application/json")
    assert response.status_code == 400


def test_cannot_revoke_someone_elses_key(admin, member):
    response = member.client().delete(f"{URL}{admin.key.id}/")
    assert response.status_code == 404
    assert admin.client().get(URL).status_code == 200


def test_revoke_is_idempotent_204(admin):
    other, _ = services.api_key_create(user=admin.user, workspace=admin.workspace, name="other")
    assert admin.client().delete(f"{URL}{other.id}/").status_code == 204
    assert admin.client().delete(f"{URL}{other.id}/").status_code == 204


def test_last_used_at_is_written_at_most_once_per_interval(admin, django_assert_num_queries, settings):
    settings.TWINMCP_API_KEY_TOUCH_SECONDS = 300
    admin.client().get(URL)
    first = ApiKey.objects.get(pk=admin.key.pk).last_used_at
    assert first is not None
    admin.client().get(URL)
    assert ApiKey.objects.get(pk=admin.key.pk).last_used_at == first
    with time_machine.travel(timezone.now() + timedelta(minutes=6)):
        admin.client().get(URL)
        assert ApiKey.objects.get(pk=admin.key.pk).last_used_at > first
