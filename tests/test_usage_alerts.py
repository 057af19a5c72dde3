"""Usage alerts: each rule kind fires above its threshold and not at or below it, each breach
notifies the workspace's admins once (in the app and by e-mail) and a new window notifies again,
a rule only ever sees its own workspace, rules are written through audited services, and the
alerts pages are for admins only."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.db import connection

from external_mcp import notifications, services
from external_mcp.choices import AuditAction, NotificationKind
from external_mcp.models import AuditEvent, ExternalMcpServer, Notification
from tests.conftest import make_actor
from twinmcp.models import Role
from usage import alerts
from usage.models import AlertBreach, AlertKind, AlertRule, Outcome, UsageEvent

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def server(admin):
    return services.server_create(workspace=admin.workspace, actor=admin.user, name="search",
                                  base_url="https://93.184.215.14/mcp")


@pytest.fixture
def other_server(outsider):
    return services.server_create(workspace=outsider.workspace, actor=outsider.user, name="search",
                                  base_url="https://93.184.215.14/mcp")


def events(actor, n, *, when=NOON - timedelta(minutes=5), server=None, outcome=Outcome.OK, method="tools/call",
           workspace=None):
    UsageEvent.objects.bulk_create([
        UsageEvent(created_at=when, user_id=actor.user.pk, workspace_id=(workspace or actor.workspace).pk,
                   server_id=server.pk if server else None, method=method, tool_name="t", request_id="r",
                   latency_ms=1.0, outcome=outcome)
        for _ in range(n)
    ])


def rule(admin, **fields):
    return alerts.alert_rule_create(workspace=admin.workspace, actor=admin.user, **fields)


def alerts_for(user):
    return list(Notification.objects.filter(user=user, kind=NotificationKind.USAGE_ALERT))


# -- each kind fires above its threshold ------------------------------------------------------------


def test_member_calls_fire_above_the_threshold_and_not_at_it(admin, member):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=3)
    events(member, 3)
    events(member, 5, method="tools/list")  # not tool calls
    assert alerts.alerts_evaluate(now=NOON) == 0
    events(member, 1)
    assert alerts.alerts_evaluate(now=NOON) == 1
    [note] = alerts_for(admin.user)
    assert note.title == "bob made 4 tool calls on 2026-11-30 (UTC), more than 3"
    assert alerts_for(member.user) == []  # admins only


def test_a_named_member_rule_ignores_the_other_members(admin, member):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=1)
    events(admin, 10)
    assert alerts.alerts_evaluate(now=NOON) == 0


def test_an_any_member_rule_fires_once_for_each_member_over(admin, member, django_user_model):
    carol = make_actor(django_user_model, "carol", admin.workspace, Role.MEMBER)
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, threshold=2)
    events(member, 3)
    events(carol, 2)
    assert alerts.alerts_evaluate(now=NOON) == 1
    events(carol, 1)
    assert alerts.alerts_evaluate(now=NOON) == 1
    assert sorted(n.title.split()[0] for n in alerts_for(admin.user)) == ["bob", "carol"]


def test_calls_of_another_utc_day_do_not_count(admin, member):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=3)
    events(member, 3, when=NOON - timedelta(days=1))
    events(member, 3)
    assert alerts.alerts_evaluate(now=NOON) == 0


def test_the_last_minute_of_yesterday_is_still_caught_just_after_midnight(admin, member):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=3)
    midnight = datetime(2026, 12, 1, tzinfo=UTC)
    events(member, 4, when=midnight - timedelta(seconds=20))
    assert alerts.alerts_evaluate(now=midnight + timedelta(seconds=40)) == 1
    assert AlertBreach.objects.get().window_start == datetime(2026, 11, 30, tzinfo=UTC)


def test_error_rate_needs_the_minimum_calls_and_more_than_the_rate(admin, member, server):
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, server_id=server.pk, threshold=50, min_calls=4)
    events(member, 3, server=server, outcome=Outcome.ERROR)  # 100 % of 3: too few calls
    assert alerts.alerts_evaluate(now=NOON) == 0
    events(member, 3, server=server)  # 50 % of 6: not above 50 %
    assert alerts.alerts_evaluate(now=NOON) == 0
    events(member, 1, server=server, outcome=Outcome.TIMEOUT)  # 4 of 7
    assert alerts.alerts_evaluate(now=NOON) == 1
    [note] = alerts_for(admin.user)
    assert note.title == "search failed 57% of its requests in the last hour (4 of 7)"


def test_error_rate_counts_only_the_last_hour_and_only_error_outcomes(admin, member, server):
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, threshold=10, min_calls=2)
    events(member, 10, server=server, outcome=Outcome.ERROR, when=NOON - timedelta(minutes=61))
    events(member, 5, server=server, outcome=Outcome.QUOTA)
    events(member, 5, server=server, outcome=Outcome.BLOCKED)
    assert alerts.alerts_evaluate(now=NOON) == 0
    events(member, 2, server=server, outcome=Outcome.UPSTREAM_ERROR)
    assert alerts.alerts_evaluate(now=NOON) == 1


def test_quota_rejection_fires_on_the_first_one_of_the_named_member(admin, member, django_user_model):
    carol = make_actor(django_user_model, "carol", admin.workspace, Role.MEMBER)
    rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=member.user.pk)
    events(carol, 3, outcome=Outcome.QUOTA)
    events(member, 5)
    assert alerts.alerts_evaluate(now=NOON) == 0
    events(member, 1, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 1
    [note] = alerts_for(admin.user)
    assert note.title == "bob was refused 1 call by the daily quota on 2026-11-30 (UTC)"


def test_a_disabled_rule_never_fires(admin, member):
    r = rule(admin, kind=AlertKind.QUOTA_REJECTION)
    alerts.alert_rule_update(rule=r, actor=admin.user, enabled=False)
    events(member, 1, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 0
    alerts.alert_rule_update(rule=r, actor=admin.user, enabled=True)
    assert alerts.alerts_evaluate(now=NOON) == 1


def test_evaluation_is_one_query_per_rule_kind_whatever_the_members(admin, member, server, django_user_model,
                                                                    django_assert_num_queries):
    for i in range(6):
        actor = make_actor(django_user_model, f"m{i}", admin.workspace, Role.MEMBER)
        rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=actor.user.pk, threshold=100)
        rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=actor.user.pk)
        events(actor, 3, server=server)
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, threshold=50)
    with django_assert_num_queries(4):  # the rules, then one aggregate per kind
        assert alerts.alerts_evaluate(now=NOON) == 0


def test_beat_runs_the_evaluation_task_every_minute(admin, member, settings):
    from usage import tasks

    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"].endswith("evaluate_usage_alerts"))
    assert entry["task"] == "usage.tasks.evaluate_usage_alerts" and entry["schedule"] == 60.0
    rule(admin, kind=AlertKind.QUOTA_REJECTION)
    events(member, 1, outcome=Outcome.QUOTA, when=datetime.now(UTC))
    assert tasks.evaluate_usage_alerts() == 1
    assert tasks.evaluate_usage_alerts() == 0


# -- once per breach --------------------------------------------------------------------------------


def test_a_breach_notifies_once_and_a_new_day_notifies_again(admin, member):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=1)
    events(member, 2)
    assert alerts.alerts_evaluate(now=NOON) == 1
    events(member, 5)
    assert alerts.alerts_evaluate(now=NOON) == 0
    assert alerts.alerts_evaluate(now=NOON + timedelta(minutes=1)) == 0
    assert len(alerts_for(admin.user)) == 1
    tomorrow = NOON + timedelta(days=1)
    events(member, 2, when=tomorrow - timedelta(minutes=1))
    assert alerts.alerts_evaluate(now=tomorrow) == 1
    assert len(alerts_for(admin.user)) == 2


def test_an_error_rate_breach_notifies_once_per_hour(admin, member, server):
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, server_id=server.pk, threshold=10, min_calls=1)
    events(member, 2, server=server, outcome=Outcome.ERROR, when=NOON + timedelta(minutes=5))
    assert alerts.alerts_evaluate(now=NOON + timedelta(minutes=10)) == 1
    assert alerts.alerts_evaluate(now=NOON + timedelta(minutes=50)) == 0
    assert alerts.alerts_evaluate(now=NOON + timedelta(minutes=62)) == 1  # next hour, still failing
    assert alerts.alerts_evaluate(now=NOON + timedelta(minutes=130)) == 0  # the errors are over an hour old
    assert len(alerts_for(admin.user)) == 2


@pytest.mark.django_db(transaction=True)
def test_two_workers_at_once_notify_a_breach_once(admin, member):
    rule(admin, kind=AlertKind.QUOTA_REJECTION)
    events(member, 1, outcome=Outcome.QUOTA)
    barrier = threading.Barrier(2)
    results: list[int] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(alerts.alerts_evaluate(now=NOON))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0, 1]
    assert AlertBreach.objects.count() == 1
    assert len(alerts_for(admin.user)) == 1


def test_every_admin_is_notified_and_emailed(admin, member, django_user_model):
    second = make_actor(django_user_model, "dora", admin.workspace, Role.ADMIN)
    admin.user.email = "alice@example.com"
    admin.user.save()
    second.user.email = "dora@example.com"
    second.user.save()
    rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=member.user.pk)
    events(member, 1, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 1
    assert len(alerts_for(admin.user)) == len(alerts_for(second.user)) == 1
    assert notifications.email_sweep() == 2
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@example.com", "dora@example.com"]
    assert mail.outbox[0].subject == "[TwinMCP] bob was refused 1 call by the daily quota on 2026-11-30 (UTC)"
    alerts.alerts_evaluate(now=NOON)
    assert notifications.email_sweep() == 0


# -- workspace isolation ----------------------------------------------------------------------------


def test_a_rule_never_counts_another_workspaces_events(admin, member, outsider, server):
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, threshold=1)
    rule(admin, kind=AlertKind.QUOTA_REJECTION)
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, threshold=10, min_calls=1)
    # The member's calls recorded under the other workspace (e.g. through a key of it): not ours.
    events(member, 5, workspace=outsider.workspace, server=server, outcome=Outcome.ERROR)
    events(outsider, 5, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 0


def test_a_breach_never_notifies_another_workspaces_admins(admin, member, outsider, other_server):
    rule(admin, kind=AlertKind.QUOTA_REJECTION)
    alerts.alert_rule_create(workspace=outsider.workspace, actor=outsider.user, kind=AlertKind.QUOTA_REJECTION)
    events(member, 1, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 1
    assert len(alerts_for(admin.user)) == 1
    assert alerts_for(outsider.user) == []
    events(outsider, 1, outcome=Outcome.QUOTA)
    assert alerts.alerts_evaluate(now=NOON) == 1
    assert [n.title.split()[0] for n in alerts_for(outsider.user)] == ["eve"]
    assert len(alerts_for(admin.user)) == 1


def test_a_server_moved_to_another_workspace_is_not_named_in_its_old_workspaces_alerts(admin, member, outsider):
    moved = services.server_create(workspace=admin.workspace, actor=admin.user, name="secret-name",
                                   base_url="https://93.184.215.14/mcp")
    rule(admin, kind=AlertKind.SERVER_ERROR_RATE, threshold=10, min_calls=1)
    events(member, 2, server=moved, outcome=Outcome.ERROR)
    ExternalMcpServer.objects.filter(pk=moved.pk).update(workspace=outsider.workspace)
    assert alerts.alerts_evaluate(now=NOON) == 1
    [note] = alerts_for(admin.user)
    assert "secret-name" not in note.title + note.body
    assert note.title.startswith("A server no longer in this workspace failed 100%")


# -- services: validation and audit -----------------------------------------------------------------


def test_create_update_delete_write_audit_rows(admin, member):
    r = rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=10)
    rule_id = str(r.pk)
    alerts.alert_rule_update(rule=r, actor=admin.user, threshold=20)
    alerts.alert_rule_update(rule=r, actor=admin.user, threshold=20)  # no change, no row
    alerts.alert_rule_delete(rule=r, actor=admin.user)
    rows = list(AuditEvent.objects.filter(workspace=admin.workspace, action__startswith="alert_rule").order_by("at"))
    assert [row.action for row in rows] == [AuditAction.ALERT_RULE_CREATE, AuditAction.ALERT_RULE_UPDATE,
                                            AuditAction.ALERT_RULE_DELETE]
    assert all(row.actor == admin.user and row.server is None for row in rows)
    assert rows[0].changes["member_id"] == member.user.pk and rows[0].changes["threshold"] == 10
    assert rows[1].changes == {"alert_rule": rule_id, "threshold": 20}
    assert rows[2].changes["alert_rule"] == rule_id
    assert not AlertRule.objects.exists()


@pytest.mark.parametrize(("fields", "field"), [
    ({"kind": "nope"}, "kind"),
    ({"kind": AlertKind.MEMBER_DAILY_CALLS}, "threshold"),
    ({"kind": AlertKind.MEMBER_DAILY_CALLS, "threshold": 0}, "threshold"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 101}, "threshold"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 10, "min_calls": 0}, "min_calls"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 10, "server_id": "not-a-uuid"}, "server"),
    ({"kind": AlertKind.QUOTA_REJECTION, "member_id": "x"}, "member"),
])
def test_bad_rules_are_refused_naming_the_field(admin, fields, field):
    with pytest.raises(alerts.ValidationError) as exc:
        rule(admin, **fields)
    assert field in exc.value.message_dict
    assert not AuditEvent.objects.filter(action=AuditAction.ALERT_RULE_CREATE).exists()


def test_another_workspaces_member_or_server_is_refused(admin, outsider, other_server):
    with pytest.raises(alerts.ValidationError) as exc:
        rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=outsider.user.pk)
    assert "member" in exc.value.message_dict
    with pytest.raises(alerts.ValidationError) as exc:
        rule(admin, kind=AlertKind.SERVER_ERROR_RATE, threshold=5, server_id=other_server.pk)
    assert "server" in exc.value.message_dict


# -- pages ------------------------------------------------------------------------------------------


def test_the_alerts_page_lists_the_rules_with_their_last_breach(admin_web, admin, member):
    rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=member.user.pk)
    rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, threshold=500)
    events(member, 1, outcome=Outcome.QUOTA)
    alerts.alerts_evaluate(now=NOON)
    page = admin_web.get("/usage/alerts/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "bob is refused a call by the daily quota" in html
    assert "Any member makes more than 500 tool calls in a UTC day" in html
    assert html.count('datetime="2026-11-30T12:00:00+00:00"') == 1  # one breach, the other rule says Never
    assert "Never" in html


def test_a_member_gets_403_on_every_alerts_page(member_web, admin, member):
    r = rule(admin, kind=AlertKind.QUOTA_REJECTION)
    for url in ("/usage/alerts/", "/usage/alerts/new/", f"/usage/alerts/{r.pk}/edit/",
                f"/usage/alerts/{r.pk}/delete/"):
        assert member_web.get(url).status_code == 403, url
    assert member_web.post(f"/usage/alerts/{r.pk}/toggle/").status_code == 403
    assert member_web.post(f"/usage/alerts/{r.pk}/delete/").status_code == 403
    assert member_web.post("/usage/alerts/new/", {"kind": AlertKind.QUOTA_REJECTION}).status_code == 403
    assert AlertRule.objects.get().enabled and AlertRule.objects.count() == 1


def test_an_outsider_never_sees_or_changes_another_workspaces_rules(outsider_web, admin, outsider):
    r = rule(admin, kind=AlertKind.QUOTA_REJECTION)
    page = outsider_web.get("/usage/alerts/")
    assert page.status_code == 200 and str(r.pk) not in page.content.decode()
    for url in (f"/usage/alerts/{r.pk}/edit/", f"/usage/alerts/{r.pk}/delete/"):
        assert outsider_web.get(url).status_code == 404, url
    assert outsider_web.post(f"/usage/alerts/{r.pk}/toggle/").status_code == 404
    assert outsider_web.post(f"/usage/alerts/{r.pk}/delete/").status_code == 404
    assert outsider_web.post(f"/usage/alerts/{r.pk}/edit/", {"kind": AlertKind.QUOTA_REJECTION}).status_code == 404
    assert AlertRule.objects.get().enabled


def test_an_admin_adds_edits_toggles_and_deletes_a_rule(admin_web, admin, member, server):
    form = admin_web.get("/usage/alerts/new/").content.decode()
    assert f'value="{member.user.pk}">bob</option>' in form and f'value="{server.pk}">search</option>' in form
    response = admin_web.post("/usage/alerts/new/", {"kind": AlertKind.SERVER_ERROR_RATE, "server": str(server.pk),
                                                     "threshold": "25", "min_calls": "10", "enabled": "on"})
    assert response.status_code == 302 and response["Location"] == "/usage/alerts/"
    r = AlertRule.objects.get()
    assert (r.workspace, r.server_id, r.threshold, r.min_calls, r.enabled) == (admin.workspace, server.pk, 25, 10,
                                                                               True)
    response = admin_web.post(f"/usage/alerts/{r.pk}/edit/", {"kind": AlertKind.SERVER_ERROR_RATE, "server": "",
                                                              "threshold": "30", "min_calls": "10", "enabled": "on"})
    assert response.status_code == 302
    r.refresh_from_db()
    assert r.server_id is None and r.threshold == 30
    partial = admin_web.post(f"/usage/alerts/{r.pk}/toggle/", HTTP_HX_REQUEST="true")
    assert partial.status_code == 200 and "<html" not in partial.content.decode()
    assert "Disabled" in partial.content.decode()
    r.refresh_from_db()
    assert not r.enabled
    assert admin_web.post(f"/usage/alerts/{r.pk}/delete/").status_code == 302
    assert not AlertRule.objects.exists()
    assert AuditEvent.objects.filter(action__startswith="alert_rule").count() == 4


def test_form_errors_are_shown_next_to_their_fields(admin_web, admin, outsider, other_server):
    response = admin_web.post("/usage/alerts/new/", {"kind": AlertKind.MEMBER_DAILY_CALLS, "threshold": ""})
    assert response.status_code == 400
    assert 'id="id_threshold_error"' in response.content.decode()
    response = admin_web.post("/usage/alerts/new/", {"kind": AlertKind.SERVER_ERROR_RATE, "threshold": "10",
                                                     "server": str(other_server.pk)})
    assert response.status_code == 400
    assert 'id="id_server_error"' in response.content.decode()  # not one of the choices offered
    response = admin_web.post("/usage/alerts/new/", {"kind": AlertKind.SERVER_ERROR_RATE, "threshold": "150"})
    assert response.status_code == 400 and 'id="id_threshold_error"' in response.content.decode()
    assert not AlertRule.objects.exists()


def test_the_alerts_list_query_count_does_not_grow_with_rules(admin_web, admin, member, server,
                                                              django_assert_max_num_queries):
    def count(**extra) -> int:
        from django.db import connection as conn
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(conn) as ctx:
            assert admin_web.get("/usage/alerts/", **extra).status_code == 200
        return len(ctx)

    rule(admin, kind=AlertKind.QUOTA_REJECTION, member_id=member.user.pk)
    admin_web.get("/usage/alerts/")  # warm the caches
    few, few_partial = count(), count(HTTP_HX_REQUEST="true")
    for _ in range(8):
        rule(admin, kind=AlertKind.SERVER_ERROR_RATE, server_id=server.pk, threshold=5)
        rule(admin, kind=AlertKind.MEMBER_DAILY_CALLS, member_id=member.user.pk, threshold=5)
    events(member, 6, server=server, outcome=Outcome.ERROR)
    alerts.alerts_evaluate(now=NOON)
    assert count() == few
    assert count(HTTP_HX_REQUEST="true") == few_partial
    with django_assert_max_num_queries(12):
        admin_web.get("/usage/alerts/")


# -- API --------------------------------------------------------------------------------------------

API = "/api/v1/usage/alert-rules/"


def test_an_admin_creates_reads_changes_and_deletes_rules_through_the_api(admin, member, server, flag_on):
    client = admin.client()
    created = client.post(API, {"kind": AlertKind.MEMBER_DAILY_CALLS, "member": "bob", "threshold": 50},
                          format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["member"] == "bob" and body["threshold"] == 50 and body["workspace"] == "acme"
    assert body["description"] == "bob makes more than 50 tool calls in a UTC day" and body["last_breach_at"] is None
    listed = client.get(API).json()
    assert [r["id"] for r in listed["results"]] == [body["id"]]
    changed = client.patch(f"{API}{body['id']}/", {"member": None, "enabled": False}, format="json")
    assert changed.status_code == 200 and changed.json()["member"] is None and changed.json()["enabled"] is False
    assert client.delete(f"{API}{body['id']}/").status_code == 204
    assert [e.action for e in AuditEvent.objects.filter(action__startswith="alert_rule").order_by("at")] == [
        AuditAction.ALERT_RULE_CREATE, AuditAction.ALERT_RULE_UPDATE, AuditAction.ALERT_RULE_DELETE]


@pytest.mark.parametrize(("payload", "field"), [
    ({"kind": "nope"}, "kind"),
    ({}, "kind"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 150}, "threshold"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": "many"}, "threshold"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 5, "server": "nope"}, "server"),
    ({"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 5, "min_calls": 0}, "min_calls"),
    ({"kind": AlertKind.MEMBER_DAILY_CALLS, "threshold": 5, "member": "eve"}, "member"),
    ({"kind": AlertKind.MEMBER_DAILY_CALLS, "threshold": 5, "member": "99999999999999999999999"}, "member"),
    ({"kind": AlertKind.MEMBER_DAILY_CALLS, "threshold": 5, "member": "²"}, "member"),
    ({"kind": AlertKind.QUOTA_REJECTION, "server": "00000000-0000-0000-0000-000000000001"}, "server"),
    ({"kind": AlertKind.QUOTA_REJECTION, "enabled": "perhaps"}, "enabled"),
])
def test_api_bad_input_is_a_400_naming_the_field(admin, outsider, flag_on, payload, field):
    response = admin.client().post(API, payload, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not AlertRule.objects.exists()


def test_api_another_workspaces_server_is_refused(admin, other_server, flag_on):
    response = admin.client().post(API, {"kind": AlertKind.SERVER_ERROR_RATE, "threshold": 5,
                                         "server": str(other_server.pk)}, format="json")
    assert response.status_code == 400 and "server" in response.json()


def test_api_members_get_403_and_outsiders_404(admin, member, outsider, flag_on):
    r = rule(admin, kind=AlertKind.QUOTA_REJECTION)
    assert member.client().get(API).status_code == 403
    assert member.client().post(API, {"kind": AlertKind.QUOTA_REJECTION}, format="json").status_code == 403
    assert member.client().get(f"{API}{r.pk}/").status_code == 403
    assert member.client().delete(f"{API}{r.pk}/").status_code == 403
    assert outsider.client().get(API).json()["results"] == []
    for call in (outsider.client().get, outsider.client().delete):
        assert call(f"{API}{r.pk}/").status_code == 404
    assert outsider.client().patch(f"{API}{r.pk}/", {"enabled": False}, format="json").status_code == 404
    assert AlertRule.objects.get().enabled
