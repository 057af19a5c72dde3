from __future__ import annotations

import pytest
from django.conf import settings as django_settings
from django.test import RequestFactory
from waffle.models import Flag

from twinmcp import services
from twinmcp.flags import external_mcp_enabled, flag_enable_for_workspace
from twinmcp.models import Membership, Plan


def test_every_user_gets_the_free_plan_by_default(member, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 7
    profile = member.user.profile
    assert profile.plan.code == "free"
    assert profile.plan.effective_daily_limit == 7


def test_pro_plan_has_no_cap_and_free_can_be_overridden(db):
    assert Plan.objects.get(code="pro").effective_daily_limit is None
    free = Plan.objects.get(code="free")
    free.daily_limit = 1000
    assert free.effective_daily_limit == 1000


def test_unknown_plan_is_refused(member):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as exc:
        services.profile_set_plan(user=member.user, code="gold")
    assert "plan" in exc.value.message_dict


def test_roles(admin, member, outsider):
    assert list(Membership.objects.admins().filter(workspace=admin.workspace).values_list("user__username",
                                                                                          flat=True)) == ["alice"]
    assert Membership.objects.get(user=member.user).role == "member"
    assert not Membership.objects.filter(user=outsider.user, workspace=admin.workspace).exists()


def _request(user):
    request = RequestFactory().get("/")
    request.user = user
    return request


def test_flag_is_off_by_default(admin):
    assert not external_mcp_enabled(_request(admin.user))


def test_flag_on_for_one_workspace_only(admin, outsider):
    flag_enable_for_workspace(workspace=admin.workspace)
    assert external_mcp_enabled(_request(admin.user))
    assert not external_mcp_enabled(_request(outsider.user))
    assert not external_mcp_enabled(_request(admin.user), workspace_ids=[outsider.workspace.pk])


def test_flag_on_for_everyone(admin, outsider):
    flag = Flag.objects.get(name=django_settings.EXTERNAL_MCP_FLAG)
    flag.everyone = True
    flag.save()
    assert external_mcp_enabled(_request(outsider.user))


def test_flag_missing_is_off(admin):
    Flag.objects.filter(name=django_settings.EXTERNAL_MCP_FLAG).delete()
    assert not external_mcp_enabled(_request(admin.user))


def test_home_requires_login_and_lists_workspaces(client, admin):
    assert client.get("/").status_code == 302
    client.force_login(admin.user)
    page = client.get("/")
    assert page.status_code == 200
    assert b"Acme" in page.content


def test_login_page_and_logout(client, admin):
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and b'for="id_username"' in page.content
    assert client.post("/accounts/login/", {"username": "alice", "password": "pw-alicealice"}).status_code == 302
    assert client.get("/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/").status_code == 302


def test_static_css_is_served(client, db):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "path", [f"twinmcp/{m}/" for m in ("workspace", "membership", "plan", "profile", "apikey")] + ["waffle/flag/"]
)
def test_django_admin_pages_render(admin_client, admin, path):
    response = admin_client.get(f"/admin/{path}")
    assert response.status_code == 200
    assert admin.raw_key not in response.content.decode()
    assert admin.key.key_hash not in response.content.decode()
