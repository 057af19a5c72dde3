"""The audit log page: admins read the events of the workspaces they administer, filtered in the
URL by actor, action, server and UTC period, a page at a time, in a fixed number of queries."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import connection
from django.test.utils import CaptureQueriesContext

from external_mcp import services as server_services
from external_mcp.choices import AuditAction
from external_mcp.models import AuditEvent
from twinmcp import audit_views, members
from twinmcp.models import Membership, Role

PUBLIC_URL = "https://93.184.215.14/mcp"


def html(response) -> str:
    return response.content.decode()


def event(workspace, actor, action, *, at, server=None, changes=None) -> AuditEvent:
    return AuditEvent.objects.create(workspace=workspace, actor=actor, action=action, at=at, server=server,
                                     server_name=server.name if server else "", changes=changes or {})


def shown(response) -> list[str]:
    return [str(e.pk) for e in response.context["events"]]


def test_admin_sees_their_workspaces_events_only_member_403_outsider_sees_only_their_own(
        client, admin, member, outsider):
    mine = event(admin.workspace, admin.user, AuditAction.MEMBER_ADD, at=datetime(2026, 3, 1, tzinfo=UTC))
    theirs = event(outsider.workspace, outsider.user, AuditAction.MEMBER_ADD, at=datetime(2026, 3, 1, tzinfo=UTC))
    client.force_login(admin.user)
    assert shown(client.get("/audit/")) == [str(mine.pk)]
    client.force_login(member.user)
    assert client.get("/audit/").status_code == 403
    client.force_login(outsider.user)
    response = client.get("/audit/")
    assert shown(response) == [str(theirs.pk)] and f'id="event-{mine.pk}"' not in html(response)


def test_filters_by_actor_action_server_and_utc_period(client, admin, member):
    ws = admin.workspace
    crm = server_services.server_create(workspace=ws, actor=admin.user, name="crm", base_url=PUBLIC_URL)
    AuditEvent.objects.all().delete()
    a = event(ws, admin.user, AuditAction.UPDATE, server=crm, at=datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC))
    b = event(ws, member.user, AuditAction.UPDATE, server=crm, at=datetime(2026, 3, 2, 0, 0, tzinfo=UTC))
    c = event(ws, admin.user, AuditAction.MEMBER_ROLE, at=datetime(2026, 3, 3, 12, tzinfo=UTC))
    client.force_login(admin.user)
    assert shown(client.get("/audit/")) == [str(c.pk), str(b.pk), str(a.pk)]
    assert shown(client.get("/audit/?actor=bob")) == [str(b.pk)]
    assert shown(client.get("/audit/?action=member.role")) == [str(c.pk)]
    assert shown(client.get(f"/audit/?server={crm.pk}")) == [str(b.pk), str(a.pk)]
    assert shown(client.get("/audit/?start=2026-03-02")) == [str(c.pk), str(b.pk)]
    assert shown(client.get("/audit/?end=2026-03-01")) == [str(a.pk)]
    assert shown(client.get("/audit/?start=2026-03-02&end=2026-03-02&actor=bob")) == [str(b.pk)]
    bad = client.get("/audit/?start=2026-03-05&end=2026-03-01&action=nope")
    assert bad.status_code == 400
    assert 'id="id_end_error"' in html(bad) and 'id="id_action_error"' in html(bad)


def test_changes_are_shown_readably_and_escaped(client, admin):
    event(admin.workspace, admin.user, AuditAction.UPDATE, at=datetime(2026, 3, 1, tzinfo=UTC),
          changes={"name": ["<b>old</b>", "<script>x</script>"]})
    client.force_login(admin.user)
    page = html(client.get("/audit/"))
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    assert '"name": [' in page.replace("&quot;", '"')


def test_member_events_from_the_members_page_appear_with_no_server(admin_web, admin, member):
    members.membership_role_change(membership=Membership.objects.get(user=member.user), actor=admin.user,
                                   role=Role.ADMIN)
    page = html(admin_web.get("/audit/?action=member.role"))
    assert "Member role changed" in page and "bob" in page


def test_pages_keep_the_filters_and_cost_a_fixed_number_of_queries(client, admin, member, django_user_model,
                                                                   django_assert_num_queries):
    ws = admin.workspace
    client.force_login(admin.user)

    def queries(url: str) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url).status_code == 200
        return len(ctx)

    for i in range(3):
        event(ws, admin.user, AuditAction.UPDATE, at=datetime(2026, 3, 1, i, tzinfo=UTC))
    queries("/audit/")  # the first request of a session also loads what later ones find cached
    few = queries("/audit/")
    for i in range(audit_views.PAGE_SIZE + 5):
        user = django_user_model.objects.create_user(username=f"actor{i}")
        event(ws, user, AuditAction.UPDATE, at=datetime(2026, 3, 2, 0, i, tzinfo=UTC))
    with django_assert_num_queries(few):
        full = client.get("/audit/")
    assert html(full).count('<tr id="event-') == audit_views.PAGE_SIZE
    response = client.get("/audit/?action=update")
    assert len(response.context["events"]) == audit_views.PAGE_SIZE
    assert 'href="?action=update&amp;page=2"' in html(response)
    second = client.get("/audit/?action=update&page=2")
    assert len(second.context["events"]) == 8


def test_nav_shows_the_audit_log_to_admins_only(client, admin, member):
    client.force_login(admin.user)
    assert 'href="/audit/"' in html(client.get("/api-keys/"))
    client.force_login(member.user)
    assert 'href="/audit/"' not in html(client.get("/api-keys/"))


def test_the_server_page_links_its_history_for_admins(admin_web, admin):
    crm = server_services.server_create(workspace=admin.workspace, actor=admin.user, name="crm", base_url=PUBLIC_URL)
    page = html(admin_web.get(f"/servers/{crm.pk}/"))
    assert f'href="/audit/?server={crm.pk}"' in page
    history = admin_web.get(f"/audit/?server={crm.pk}")
    assert [e.action for e in history.context["events"]] == [AuditAction.CREATE]


def test_htmx_filtering_gets_the_table_alone_and_invalid_filters_say_so(client, admin):
    event(admin.workspace, admin.user, AuditAction.MEMBER_ADD, at=datetime(2026, 3, 1, tzinfo=UTC))
    client.force_login(admin.user)
    partial = client.get("/audit/?action=member.add", headers={"HX-Request": "true"})
    body = html(partial)
    assert partial.status_code == 200 and "<html" not in body and 'id="audit-events"' in body
    assert partial["Vary"].count("HX-Request") == 1
    bad = client.get("/audit/?start=nonsense", headers={"HX-Request": "true"})
    assert bad.status_code == 200 and "Some filters are invalid" in html(bad) and "From (UTC)" in html(bad)
