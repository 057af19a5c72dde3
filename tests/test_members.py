"""The members page and API: admins add, create, promote, demote and remove members; members read;
outsiders see nothing. A workspace never loses its last admin, not even to two concurrent
demotions, and a removed member's keys and own connections stop working at once."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from external_mcp import services as server_services
from external_mcp.choices import AuditAction
from external_mcp.models import AuditEvent, Connection
from tests import mcp_peers
from tests.gateway import proxy_url, register
from twinmcp import members
from twinmcp.models import ApiKey, Membership, Role

PUBLIC_URL = "https://93.184.215.14/mcp"


def page_url(workspace) -> str:
    return f"/workspaces/{workspace.pk}/members/"


def html(response) -> str:
    return response.content.decode()


def role_of(user, workspace) -> str | None:
    return Membership.objects.filter(user=user, workspace=workspace).values_list("role", flat=True).first()


# -- the page and who sees it ----------------------------------------------------------------------------


def test_admin_sees_every_member_with_the_forms(admin_web, admin, member):
    page = html(admin_web.get(page_url(admin.workspace)))
    assert f'id="member-{admin.user.pk}"' in page and f'id="member-{member.user.pk}"' in page
    assert "Add an existing user" in page and "Create a new user" in page
    assert f"/workspaces/{admin.workspace.pk}/members/{member.user.pk}/remove/" in page
    assert "The only admin" in page


def test_member_sees_the_list_read_only(member_web, admin, member):
    page = html(member_web.get(page_url(member.workspace)))
    assert "alice" in page and "bob" in page
    assert "Add an existing user" not in page and "/remove/" not in page and "/role/" not in page


def test_outsider_gets_404_everywhere(outsider_web, admin, member):
    ws = admin.workspace
    assert outsider_web.get(page_url(ws)).status_code == 404
    assert outsider_web.post(f"{page_url(ws)}add/", {"add-user": "eve", "add-role": "admin"}).status_code == 404
    assert outsider_web.post(f"{page_url(ws)}new/", {"new-username": "x", "new-role": "admin"}).status_code == 404
    assert outsider_web.post(f"{page_url(ws)}{member.user.pk}/role/", {"role": "admin"}).status_code == 404
    assert outsider_web.get(f"{page_url(ws)}{member.user.pk}/remove/").status_code == 404
    assert outsider_web.post(f"{page_url(ws)}{member.user.pk}/remove/").status_code == 404
    assert role_of(member.user, ws) == Role.MEMBER and role_of(admin.user, ws) == Role.ADMIN


def test_member_is_refused_every_write(member_web, admin, member, outsider):
    ws = member.workspace
    assert member_web.post(f"{page_url(ws)}add/", {"add-user": "eve", "add-role": "member"}).status_code == 403
    assert member_web.post(f"{page_url(ws)}new/", {"new-username": "mallory", "new-role": "admin"}).status_code == 403
    assert member_web.post(f"{page_url(ws)}{member.user.pk}/role/", {"role": "admin"}).status_code == 403
    assert member_web.get(f"{page_url(ws)}{admin.user.pk}/remove/").status_code == 403
    assert member_web.post(f"{page_url(ws)}{admin.user.pk}/remove/").status_code == 403
    assert role_of(member.user, ws) == Role.MEMBER and role_of(outsider.user, ws) is None
    assert not AuditEvent.objects.filter(workspace=ws, action__startswith="member.").exists()


def test_members_home_goes_to_the_first_workspace_or_says_there_is_none(client, admin, django_user_model):
    client.force_login(admin.user)
    assert client.get("/members/")["Location"] == page_url(admin.workspace)
    loner = django_user_model.objects.create_user(username="loner", password="pw-loner-123")
    client.force_login(loner)
    assert "not a member of any workspace" in html(client.get("/members/"))


def test_the_list_costs_the_same_queries_for_two_members_or_twelve(admin_web, admin, member, django_user_model,
                                                                   django_assert_num_queries):
    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert admin_web.get(page_url(admin.workspace)).status_code == 200
        return len(ctx)

    queries()  # the first request of a session also loads what later ones find cached
    few = queries()
    for i in range(10):
        user = django_user_model.objects.create_user(username=f"user{i}", email=f"u{i}@example.com")
        members.membership_add(workspace=admin.workspace, actor=admin.user, user=user, role=Role.MEMBER)
    with django_assert_num_queries(few):
        page = admin_web.get(page_url(admin.workspace))
    assert page.content.decode().count('<tr id="member-') == 12


# -- add and create --------------------------------------------------------------------------------------


def test_admin_adds_an_existing_user_by_username_or_email_and_it_is_audited(admin_web, admin, django_user_model):
    carol = django_user_model.objects.create_user(username="carol", email="Carol@Example.com")
    dave = django_user_model.objects.create_user(username="dave", email="dave@example.com")
    ws = admin.workspace
    response = admin_web.post(f"{page_url(ws)}add/", {"add-user": "carol", "add-role": "admin"})
    assert response.status_code == 302 and response["Location"] == page_url(ws)
    assert admin_web.post(f"{page_url(ws)}add/", {"add-user": "carol@example.com", "add-role": "x"}).status_code == 400
    by_email = admin_web.post(f"{page_url(ws)}add/", {"add-user": "DAVE@example.com", "add-role": "member"})
    assert by_email.status_code == 302
    assert role_of(carol, ws) == Role.ADMIN and role_of(dave, ws) == Role.MEMBER
    event = AuditEvent.objects.get(workspace=ws, action=AuditAction.MEMBER_ADD, changes__user="carol")
    assert event.server is None and event.server_name == "" and event.actor == admin.user
    assert event.changes == {"user": "carol", "user_id": carol.pk, "role": "admin"}


@pytest.mark.parametrize(("value", "error"), [("nobody", "No active user"), ("alice", "already a member")])
def test_adding_an_unknown_or_present_user_is_a_field_error(admin_web, admin, value, error):
    response = admin_web.post(f"{page_url(admin.workspace)}add/", {"add-user": value, "add-role": "member"})
    page = html(response)
    assert response.status_code == 400 and 'id="id_add-user_error"' in page and error in page


def test_created_user_with_a_generated_password_sees_it_once_and_can_log_in(admin_web, admin, client):
    ws = admin.workspace
    response = admin_web.post(f"{page_url(ws)}new/", {"new-username": "frank", "new-email": "frank@example.com",
                                                      "new-password": "", "new-role": "member"})
    assert response.status_code == 302 and response["Location"] == page_url(ws)
    first = admin_web.get(page_url(ws))
    assert first["Cache-Control"] == "no-store"
    password = re.search(r'<code id="new-password-value">([^<]+)</code>', html(first)).group(1)
    assert 'id="new-password-value"' not in html(admin_web.get(page_url(ws)))
    assert password not in str(admin_web.session.items())
    frank = Membership.objects.select_related("user").get(workspace=ws, user__username="frank").user
    assert frank.email == "frank@example.com" and frank.check_password(password)
    assert AuditEvent.objects.filter(workspace=ws, action=AuditAction.MEMBER_ADD, changes__user="frank").exists()


def test_a_chosen_password_is_never_shown_and_a_weak_one_is_refused(admin_web, admin):
    ws = admin.workspace
    weak = admin_web.post(f"{page_url(ws)}new/", {"new-username": "gina", "new-password": "123", "new-role": "member"})
    assert weak.status_code == 400 and 'id="id_new-password_error"' in html(weak)
    assert not Membership.objects.filter(user__username="gina").exists()
    chosen = "a-long-Chosen-passphrase-9"
    assert admin_web.post(f"{page_url(ws)}new/", {"new-username": "gina", "new-password": chosen,
                                                  "new-role": "admin"}).status_code == 302
    page = html(admin_web.get(page_url(ws)))
    assert chosen not in page and 'id="new-password-value"' not in page
    assert role_of(Membership.objects.get(user__username="gina").user, ws) == Role.ADMIN


def test_creating_a_user_that_exists_is_a_field_error(admin_web, admin):
    response = admin_web.post(f"{page_url(admin.workspace)}new/", {"new-username": "alice", "new-role": "member"})
    assert response.status_code == 400 and 'id="id_new-username_error"' in html(response)


# -- roles and the last admin -----------------------------------------------------------------------------


def test_admin_promotes_and_demotes_and_each_change_is_audited(admin_web, admin, member):
    ws = admin.workspace
    url = f"{page_url(ws)}{member.user.pk}/role/"
    assert admin_web.post(url, {"role": "admin"})["Location"] == page_url(ws)
    assert role_of(member.user, ws) == Role.ADMIN
    assert admin_web.post(url, {"role": "member"}).status_code == 302
    assert role_of(member.user, ws) == Role.MEMBER
    changes = list(AuditEvent.objects.filter(workspace=ws, action=AuditAction.MEMBER_ROLE)
                   .order_by("at").values_list("changes", flat=True))
    assert [c["role"] for c in changes] == [["member", "admin"], ["admin", "member"]]


def test_the_last_admin_cannot_be_demoted_or_removed_and_is_told_why(admin_web, admin, member):
    ws = admin.workspace
    demote = admin_web.post(f"{page_url(ws)}{admin.user.pk}/role/", {"role": "member"}, follow=True)
    assert "must keep at least one admin" in html(demote)
    remove = admin_web.post(f"{page_url(ws)}{admin.user.pk}/remove/", follow=True)
    assert "must keep at least one admin" in html(remove)
    assert role_of(admin.user, ws) == Role.ADMIN
    assert not AuditEvent.objects.filter(workspace=ws, action__startswith="member.").exists()


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_demotions_of_the_two_admins_leave_one(django_user_model):
    from twinmcp import services

    ws = services.workspace_create(slug="race", name="Race")
    for round_ in range(5):
        one = django_user_model.objects.create_user(username=f"one{round_}")
        two = django_user_model.objects.create_user(username=f"two{round_}")
        first = members.membership_add(workspace=ws, actor=None, user=one, role=Role.ADMIN)
        second = members.membership_add(workspace=ws, actor=None, user=two, role=Role.ADMIN)
        Membership.objects.filter(workspace=ws).exclude(pk__in=[first.pk, second.pk]).delete()
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def demote(membership, actor, barrier=barrier, outcomes=outcomes):
            try:
                barrier.wait(timeout=30)
                members.membership_role_change(membership=membership, actor=actor, role=Role.MEMBER)
                outcomes.append("demoted")
            except ValidationError:
                outcomes.append("refused")
            finally:
                connections.close_all()

        threads = [threading.Thread(target=demote, args=(first, two)),
                   threading.Thread(target=demote, args=(second, one))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(outcomes) == ["demoted", "refused"]
        assert Membership.objects.filter(workspace=ws).admins().count() == 1


# -- removal ------------------------------------------------------------------------------------------------


def test_remove_asks_first_then_revokes_keys_drops_own_connections_and_audits(admin_web, admin, member):
    ws = admin.workspace
    own = server_services.server_create(workspace=ws, actor=admin.user, name="own", base_url=PUBLIC_URL,
                                        auth_type="bearer", credential_mode="per_user")
    from external_mcp import connections as conns

    conns.connection_save_secret(server=own, user=member.user, credentials={"token": "member-token"})
    conns.connection_save_secret(server=own, user=admin.user, credentials={"token": "admin-token"})
    url = f"{page_url(ws)}{member.user.pk}/remove/"
    confirm = admin_web.get(url)
    assert confirm.status_code == 200 and "Remove bob from Acme?" in html(confirm)
    assert role_of(member.user, ws) == Role.MEMBER
    response = admin_web.post(url, follow=True)
    assert "bob removed from Acme; 1 API key revoked." in html(response)
    assert role_of(member.user, ws) is None
    assert ApiKey.objects.get(pk=member.key.pk).revoked_at is not None
    assert ApiKey.objects.get(pk=admin.key.pk).revoked_at is None
    assert list(Connection.objects.filter(server=own).values_list("user_id", flat=True)) == [admin.user.pk]
    event = AuditEvent.objects.get(workspace=ws, action=AuditAction.MEMBER_REMOVE)
    assert event.changes["user"] == "bob" and event.changes["keys_revoked"] == 1
    assert event.changes["connections_removed"] == 1


def test_admin_may_leave_when_another_admin_remains(admin_web, admin, member):
    ws = admin.workspace
    members.membership_role_change(membership=Membership.objects.get(user=member.user, workspace=ws),
                                   actor=admin.user, role=Role.ADMIN)
    response = admin_web.post(f"{page_url(ws)}{admin.user.pk}/remove/")
    assert response.status_code == 302 and response["Location"] == "/"
    assert role_of(admin.user, ws) is None and role_of(member.user, ws) == Role.ADMIN


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("midday", "proxy_settings", "flag_on")
def test_a_removed_members_key_is_refused_by_the_gateway_at_once(admin, member, gateway, settings):
    from tests.test_proxy import call, post

    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 300
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        assert asyncio.run(post(url, member.raw_key, call("echo", {"text": "x"})))[0] == 200
        members.membership_remove(membership=Membership.objects.get(user=member.user, workspace=member.workspace),
                                  actor=admin.user)
        status, _, body = asyncio.run(post(url, member.raw_key, call("echo", {"text": "x"})))
        assert asyncio.run(post(url, admin.raw_key, call("echo", {"text": "y"})))[0] == 200
    assert status == 401 and "revoked" in json.loads(body)["error"]["message"]


# -- the API ------------------------------------------------------------------------------------------------


def api(workspace, user_id=None) -> str:
    base = f"/api/v1/workspaces/{workspace.pk}/members/"
    return f"{base}{user_id}/" if user_id is not None else base


def test_api_lists_for_members_and_hides_the_workspace_from_outsiders(admin, member, outsider):
    listed = member.client().get(api(member.workspace))
    assert listed.status_code == 200
    assert [(m["username"], m["role"]) for m in listed.json()] == [("alice", "admin"), ("bob", "member")]
    assert outsider.client().get(api(admin.workspace)).status_code == 404
    assert outsider.client().patch(api(admin.workspace, member.user.pk), {"role": "admin"},
                                   format="json").status_code == 404
    assert outsider.client().delete(api(admin.workspace, member.user.pk)).status_code == 404
    assert member.client().post(api(member.workspace), {"user": "eve"}, format="json").status_code == 403
    assert member.client().delete(api(member.workspace, admin.user.pk)).status_code == 403
    assert role_of(admin.user, admin.workspace) == Role.ADMIN


def test_api_adds_creates_changes_and_removes_with_field_named_errors(admin, member, outsider):
    client, ws = admin.client(), admin.workspace
    added = client.post(api(ws), {"user": "eve", "role": "member"}, format="json")
    assert added.status_code == 201 and added.json()["password"] is None
    created = client.post(api(ws), {"username": "hank"}, format="json")
    assert created.status_code == 201 and created["Cache-Control"] == "no-store"
    hank = Membership.objects.get(workspace=ws, user__username="hank").user
    assert hank.check_password(created.json()["password"])
    assert client.post(api(ws), {"user": "eve", "username": "x"}, format="json").json().keys() == {"user"}
    assert client.post(api(ws), {"username": "ivy", "password": "1"}, format="json").json().keys() == {"password"}
    assert client.post(api(ws), {"user": "nobody"}, format="json").status_code == 400
    assert client.patch(api(ws, member.user.pk), {"role": "boss"}, format="json").json().keys() == {"role"}
    assert client.patch(api(ws, member.user.pk), {"role": "admin"}, format="json").json()["role"] == "admin"
    assert client.patch(api(ws, 2**40), {"role": "admin"}, format="json").status_code == 404
    assert client.delete(api(ws, outsider.user.pk)).status_code == 204
    assert role_of(outsider.user, ws) is None and role_of(outsider.user, outsider.workspace) == Role.ADMIN


def test_api_refuses_to_drop_the_last_admin_with_a_field_error(admin, member):
    client, ws = admin.client(), admin.workspace
    demote = client.patch(api(ws, admin.user.pk), {"role": "member"}, format="json")
    assert demote.status_code == 400 and "at least one admin" in demote.json()["role"][0]
    remove = client.delete(api(ws, admin.user.pk))
    assert remove.status_code == 400 and "at least one admin" in remove.json()["user"][0]
    assert role_of(admin.user, ws) == Role.ADMIN
