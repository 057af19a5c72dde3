"""The usage API: who sees what, filters and their errors, freshness, totals, paging, query counts,
and the quota status endpoint."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pytest
import redis
import time_machine
from django.db import connection
from django.http import StreamingHttpResponse
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.test_usage_aggregation import at, ev, make_server, store
from twinmcp import services as core
from usage import aggregation
from usage.limiter import get_limiter
from usage.models import UsageEvent
from usage.quota import next_reset
from usage.quota_redis import quota_key

URL = "/api/v1/external-mcp/usage"
TODAY = date(2026, 11, 21)
D1, D2 = date(2026, 11, 18), date(2026, 11, 19)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _frozen():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def servers(admin, outsider):
    return {"s1": make_server(admin, "s1"), "s2": make_server(admin, "s2"), "s3": make_server(outsider, "s3")}


@pytest.fixture
def usage(admin, member, outsider, servers, flag_on):
    s1, s2, s3 = servers["s1"], servers["s2"], servers["s3"]
    store(
        ev(at(D1, 1), admin, s1, latency=10, tokens_in=4, tokens_out=8),
        ev(at(D1, 2), admin, s1, latency=30, tokens_in=4, tokens_out=8),
        ev(at(D1, 3), admin, s2, tool="fetch", outcome="error", latency=50),
        ev(at(D2, 1), member, s1, latency=7),
        ev(at(D1, 4), outsider, s3, tool="secret-tool"),
        ev(at(TODAY, 8), admin, s1, latency=20),
    )
    aggregation.run_scheduled(NOW)  # D1..20th final; today partial, covering events before 11:55
    store(ev(at(TODAY, 11, 58), member, s2, tool="fetch", outcome="quota", latency=1))  # raw only
    return servers


def get(actor, **params):
    return actor.client().get(URL, params)


def by_day(response) -> dict[str, int]:
    return {row["day"]: row["requests"] for row in response.json()["results"]}


# -- who sees what -----------------------------------------------------------------------------------


def test_admin_sees_every_member_of_the_workspace(usage, admin):
    response = get(admin)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert by_day(response) == {"2026-11-18": 3, "2026-11-19": 1, "2026-11-21": 2}
    assert {row["workspace"] for row in body["results"]} == {"acme"}
    assert body["totals"]["requests"] == 6
    assert body["totals"]["errors"] == 1 and body["totals"]["quota_rejections"] == 1
    assert (body["start"], body["end"], body["group_by"]) == ("2026-10-23", "2026-11-21", ["day"])


def test_member_sees_only_themself(usage, member):
    assert by_day(get(member)) == {"2026-11-19": 1, "2026-11-21": 1}
    assert by_day(get(member, user="bob")) == {"2026-11-19": 1, "2026-11-21": 1}
    assert by_day(get(member, user=str(member.user.pk))) == {"2026-11-19": 1, "2026-11-21": 1}


def test_member_naming_another_user_gets_403(usage, member):
    response = get(member, user="alice")
    assert response.status_code == 403
    assert "only see their own usage" in response.json()["detail"]


def test_outsider_sees_only_their_own_workspace(usage, outsider, admin):
    response = get(outsider, group_by="tool")
    assert [(row["workspace"], row["tool"], row["requests"]) for row in response.json()["results"]] == [
        ("globex", "secret-tool", 1)]
    assert "secret-tool" not in get(admin, group_by="tool").content.decode()
    assert get(outsider, workspace="acme").status_code == 400
    assert get(outsider, user="alice").json() == {"user": ["Unknown user 'alice'."]}
    assert get(outsider, server=str(usage["s1"].pk)).json() == {"server": [f"Unknown server {usage['s1'].pk}."]}


def test_admin_filters_by_user_and_server(usage, admin, member):
    assert by_day(get(admin, user="bob")) == {"2026-11-19": 1, "2026-11-21": 1}
    assert by_day(get(admin, user=str(member.user.pk), server=str(usage["s2"].pk))) == {"2026-11-21": 1}
    assert by_day(get(admin, tool="fetch")) == {"2026-11-18": 1, "2026-11-21": 1}
    assert by_day(get(admin, workspace="acme", start="2026-11-19", end="2026-11-19")) == {"2026-11-19": 1}


def test_flag_off_is_404_and_anonymous_is_401(admin, member):
    assert get(admin).status_code == 404
    assert admin.client().get(URL + "/export").status_code == 404
    assert APIClient().get(URL).status_code == 401


def test_session_users_see_all_their_workspaces(usage, admin, outsider):
    core.member_add(workspace=outsider.workspace, user=admin.user, role="member")
    client = APIClient()
    client.force_authenticate(admin.user)
    rows = client.get(URL, {"group_by": "user"}).json()["results"]
    assert sorted((row["workspace"], row["username"]) for row in rows) == [("acme", "alice"), ("acme", "bob")]
    store(ev(at(TODAY, 11, 59), admin, usage["s3"], workspace=outsider.workspace))
    rows = client.get(URL, {"group_by": "user"}).json()["results"]
    assert ("globex", "alice") in {(row["workspace"], row["username"]) for row in rows}
    assert ("globex", "eve") not in {(row["workspace"], row["username"]) for row in rows}


# -- filters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "name"), [
    ({"server": "00000000-0000-0000-0000-000000000000"}, "server"),
    ({"server": "not-a-uuid"}, "server"),
    ({"user": "nobody"}, "user"),
    ({"user": "999999999999999999999999"}, "user"),
    ({"start": "2026-11-10", "end": "2026-11-01"}, "end"),
    ({"start": "2025-01-01", "end": "2026-11-21"}, "start"),
    ({"end": "2030-01-01", "start": "2028-01-01"}, "start"),
    ({"start": "2026-02-30"}, "start"),
    ({"end": "21/11/2026"}, "end"),
    ({"group_by": "day,week"}, "group_by"),
    ({"format": "xml"}, "format"),
    ({"workspace": "nope"}, "workspace"),
    ({"tool": "a\x00b"}, "tool"),
])
def test_bad_filters_are_400_naming_the_parameter(usage, admin, params, name):
    response = get(admin, **params)
    assert response.status_code == 400, response.content
    assert list(response.json()) == [name]


def test_the_range_maximum_is_a_setting(usage, admin, settings):
    settings.USAGE_MAX_RANGE_DAYS = 7
    assert get(admin, start="2026-11-15", end="2026-11-21").status_code == 200
    response = get(admin, start="2026-11-14", end="2026-11-21")
    assert response.json() == {"start": ["The range 2026-11-14..2026-11-21 spans 8 days; at most 7 are allowed."]}


# -- figures ------------------------------------------------------------------------------------------------


def test_days_come_from_the_aggregates_and_the_raw_events_since_the_last_fill(usage, admin, servers):
    # Whatever the stored buckets cover is never read from raw events again…
    UsageEvent.objects.filter(created_at__lt=at(TODAY, 11, 55)).delete()
    assert by_day(get(admin)) == {"2026-11-18": 3, "2026-11-19": 1, "2026-11-21": 2}
    # …and what they do not cover yet is: fresh figures before any aggregation run.
    store(ev(at(TODAY, 11, 59), admin, servers["s1"]))
    assert by_day(get(admin))["2026-11-21"] == 3
    assert get(admin, group_by="user").json()["totals"]["requests"] == 7


def test_a_fill_committed_meanwhile_counts_nothing_twice(usage, admin, servers):
    store(ev(at(TODAY, 11, 59), admin, servers["s1"]))
    later = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
    aggregation.aggregate_day(TODAY, final=False, now=later)  # now covers events before 12:25
    with time_machine.travel(later, tick=False):
        assert by_day(get(admin))["2026-11-21"] == 3
        assert get(admin, group_by="user").json()["totals"]["requests"] == 7
        buckets = get(admin, group_by="day,user,server,tool", start="2026-11-21").json()
        assert [(r["username"], r["tool"], r["requests"]) for r in buckets["results"]] == [
            ("alice", "search", 2), ("bob", "fetch", 1)]


def test_group_by_user_gives_per_user_analytics(usage, admin):
    rows = {row["username"]: row for row in get(admin, group_by="user").json()["results"]}
    alice = rows["alice"]
    assert (alice["requests"], alice["errors"], alice["unique_tools"], alice["counted"]) == (4, 1, 2, 3)
    assert alice["latency_avg_ms"] == pytest.approx((10 + 30 + 50 + 20) / 4)
    assert alice["error_rate"] == 0.25
    assert alice["latency_p95_ms"] is None  # several buckets: no percentile
    assert (alice["user_id"], alice["email"]) == (admin.user.pk, None)
    assert rows["bob"]["quota_rejections"] == 1


def test_full_buckets_carry_their_p95(usage, admin, servers):
    rows = get(admin, group_by="day,user,server,tool", start="2026-11-18", end="2026-11-18").json()["results"]
    search = next(row for row in rows if row["tool"] == "search")
    assert search["latency_p95_ms"] == pytest.approx(10 + 20 * 0.95)
    assert (search["server_id"], search["server_name"], search["username"]) == (str(servers["s1"].pk), "s1", "alice")
    today = get(admin, group_by="day,user,server,tool", start="2026-11-21", user="alice").json()
    assert [row["latency_p95_ms"] for row in today["results"]] == [20.0]
    assert today["totals"]["latency_p95_ms"] == 20.0  # a single bucket


def test_group_by_day_and_tool(usage, admin):
    rows = get(admin, group_by="day,tool").json()["results"]
    assert [(row["day"], row["tool"], row["requests"]) for row in rows] == [
        ("2026-11-18", "fetch", 1), ("2026-11-18", "search", 2), ("2026-11-19", "search", 1),
        ("2026-11-21", "fetch", 1), ("2026-11-21", "search", 1)]


def test_pagination_with_totals_over_every_group(usage, admin):
    body = get(admin, limit=1, offset=1).json()
    assert body["count"] == 3 and len(body["results"]) == 1
    assert body["results"][0]["day"] == "2026-11-19"
    assert "offset=2" in body["next"] and body["previous"]
    assert body["totals"]["requests"] == 6
    past = get(admin, limit=5, offset=50).json()
    assert past["results"] == [] and past["count"] == 3 and past["totals"]["requests"] == 6


def test_a_user_without_workspace_sees_nothing(usage, django_user_model):
    from waffle.models import Flag

    Flag.objects.filter(name="external_mcp_connect").update(everyone=True)
    client = APIClient()
    client.force_authenticate(django_user_model.objects.create_user(username="loner"))
    body = client.get(URL, {"group_by": "user"}).json()
    assert body["count"] == 0 and body["totals"]["requests"] == 0
    response = client.get(URL + "/export", {"level": "event"})
    assert b"".join(response.streaming_content).count(b"\n") == 1
    assert client.get(URL, {"user": "alice"}).status_code == 400


def test_a_range_in_the_future_is_empty(usage, admin):
    for params in ({"end": "2027-01-01"}, {"start": "9999-12-01", "end": "9999-12-31"}):
        body = get(admin, **params).json()
        assert body["results"] == [] and body["totals"]["requests"] == 0
        assert admin.client().get(URL + "/export", params).status_code == 200


def test_empty_range(usage, admin):
    body = get(admin, start="2026-01-01", end="2026-01-31").json()
    assert body["count"] == 0 and body["results"] == []
    assert body["totals"]["requests"] == 0 and body["totals"]["latency_avg_ms"] is None


def test_csv_format_and_trailing_slash(usage, admin):
    response = admin.client().get(URL + "/", {"format": "csv", "group_by": "day"})
    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert 'filename="twinmcp-usage-2026-10-23-2026-11-21.csv"' in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(row["day"], row["requests"]) for row in rows] == [("2026-11-18", "3"), ("2026-11-19", "1"),
                                                               ("2026-11-21", "2")]


def test_pseudonymized_listing(usage, admin):
    body = get(admin, group_by="user", pseudonymize="true").content.decode()
    assert "alice" not in body and "bob" not in body
    assert body.count('"user_id":"u_') == 2


def test_query_count_does_not_grow_with_rows(usage, admin, servers, django_assert_max_num_queries):
    client = admin.client()
    client.get(URL)  # warm the flag cache
    params = {"group_by": "day,user,server,tool", "user": "alice"}
    with CaptureQueriesContext(connection) as few:
        assert client.get(URL, params).status_code == 200
    store(*(ev(at(TODAY, 1, i), admin, servers["s1"], tool=f"tool-{i}") for i in range(40)))
    aggregation.run_scheduled(NOW)
    with django_assert_max_num_queries(8):
        body = client.get(URL, params).json()
    assert body["count"] == 43
    with CaptureQueriesContext(connection) as many:
        client.get(URL, {**params, "limit": 200})
    assert len(many) == len(few)


def test_schema_documents_the_endpoints(admin):
    schema = admin.client().get("/api/schema/", {"format": "json"}).json()
    assert {"/api/v1/external-mcp/usage", "/api/v1/external-mcp/usage/export", "/api/v1/usage/quota"} <= set(
        schema["paths"])
    assert "/api/v1/external-mcp/usage/" not in schema["paths"]


# -- quota status ------------------------------------------------------------------------------------------


def test_quota_status_matches_the_limiter(admin, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 7
    if settings.REDIS_URL:  # a counter left by an earlier run on the same (frozen) day
        redis.Redis.from_url(settings.REDIS_URL).delete(quota_key(admin.user.pk, TODAY))
    for _ in range(3):
        get_limiter().consume(admin.user.pk, 7)
    response = admin.client().get("/api/v1/usage/quota")  # no feature flag needed
    assert response.status_code == 200
    peek = get_limiter().peek(admin.user.pk, 7)
    assert response.json() == {"plan": "free", "limit": 7, "used": peek.used, "remaining": peek.remaining,
                               "reset_at": "2026-11-22T00:00:00Z"}
    assert peek.used == 3 and peek.remaining == 4
    assert next_reset(NOW).isoformat().startswith("2026-11-22")


def test_quota_status_on_the_database_counters_and_for_pro_users(member, settings):
    settings.REDIS_URL = ""
    core.profile_set_plan(user=member.user, code="pro")
    get_limiter().consume(member.user.pk, None, 2)
    client = APIClient()
    client.force_authenticate(member.user)
    assert client.get("/api/v1/usage/quota/").json() == {
        "plan": "pro", "limit": None, "used": 2, "remaining": None, "reset_at": "2026-11-22T00:00:00Z"}


def test_quota_status_needs_authentication(db):
    assert APIClient().get("/api/v1/usage/quota").status_code == 401


# -- tenants ------------------------------------------------------------------------------------------------


def test_usage_never_shows_the_name_of_another_workspaces_server(usage, admin, servers, admin_web):
    """Rows recorded in acme with globex's server id (what the proxy once wrote for calls to foreign
    ids) show that id as unknown, exactly like an id that never existed: no name, no oracle."""
    foreign, missing = servers["s3"], SimpleNamespace(pk=uuid.uuid4())
    store(ev(at(TODAY, 11, 57), admin, foreign, tool="probe"), ev(at(TODAY, 11, 57), admin, missing, tool="probe"))

    def shown() -> dict[str, str | None]:
        rows = get(admin, group_by="server", start=str(TODAY)).json()["results"]
        return {row["server_id"]: row["server_name"] for row in rows}

    def exported(**params) -> str:
        response = admin.client().get(URL + "/export", {"start": str(TODAY), **params})
        assert response.status_code == 200
        return b"".join(response.streaming_content).decode()

    def check() -> None:
        names = shown()
        assert names[str(foreign.pk)] is None and names[str(missing.pk)] is None
        assert names[str(servers["s1"].pk)] == "s1"
        buckets = get(admin, group_by="day,user,server,tool", start=str(TODAY), tool="probe").json()["results"]
        assert [row["server_name"] for row in buckets] == [None, None]
        for params in ({"format": "json"}, {"format": "jsonl"}, {"format": "json", "level": "event"},
                       {"format": "json", "group_by": "server"}):
            assert '"s3"' not in exported(**params), params
        for params in ({"format": "csv"}, {"format": "csv", "level": "event"}):
            rows = list(csv.DictReader(io.StringIO(exported(**params))))
            assert {row["server_name"] for row in rows if row["tool"] == "probe"} == {""}, params
        csv_rows = list(csv.DictReader(io.StringIO(b"".join(admin.client().get(
            URL, {"format": "csv", "group_by": "server", "start": str(TODAY)}).streaming_content).decode())))
        assert "s3" not in {row["server_name"] for row in csv_rows}

    check()  # today's figures come from the raw events…
    aggregation.aggregate_day(TODAY, final=False, now=datetime(2026, 11, 21, 12, 30, tzinfo=UTC))
    with time_machine.travel(datetime(2026, 11, 21, 12, 30, tzinfo=UTC), tick=False):
        check()  # …and from the stored buckets once aggregated
        page = admin_web.get("/usage/").content.decode()
        # As text or as a quoted value; a bare substring would also match the page's random CSRF tokens.
        assert ">s3<" not in page and '"s3"' not in page
