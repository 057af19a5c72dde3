"""Requests split by outcome everywhere usage is shown: the daily aggregates, the usage API (stored
buckets and the fresh raw events after them alike), the exports (new columns appended after the
historical ones) and the dashboard page, whose table rows link to the page filtered to them."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime

import pytest
import time_machine

from tests.test_usage_aggregation import at, ev, make_server, store
from usage import aggregation
from usage.models import Outcome, UsageDaily

URL = "/api/v1/external-mcp/usage"
EXPORT = "/api/v1/external-mcp/usage/export"
TODAY = date(2026, 11, 21)
D1 = date(2026, 11, 18)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

# Per outcome, how many events the fixture records on D1 (aggregated, final) and today (raw only).
COUNTS = {"ok": 3, "error": 2, "quota": 4, "blocked": 1, "timeout": 5, "upstream_error": 6, "client_disconnect": 7}
SPLIT = dict(COUNTS)
LEGACY_BUCKET_COLUMNS = [
    "workspace", "day", "user_id", "username", "email", "server_id", "server_name", "tool", "requests", "counted",
    "errors", "quota_rejections", "blocked", "tokens_in", "tokens_out", "bytes_in", "bytes_out", "latency_avg_ms",
    "latency_p95_ms", "first_at", "last_at", "error_rate",
]
NEW_COLUMNS = ["timeouts", "upstream_errors", "client_disconnects", "outcome_ok", "outcome_error", "outcome_quota",
               "outcome_blocked", "outcome_timeout", "outcome_upstream_error", "outcome_client_disconnect"]


@pytest.fixture(autouse=True)
def _frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def events_of_every_outcome(day: date, actor, server, hour: int, minute: int = 0) -> None:
    events = []
    for outcome, count in COUNTS.items():
        events += [ev(at(day, hour, minute, i), actor, server, outcome=outcome) for i in range(count)]
    store(*events)


@pytest.fixture
def server(admin, outsider, flag_on):
    s = make_server(admin, "s1")
    make_server(outsider, "s3")
    return s


@pytest.fixture
def aggregated(admin, server):
    """Every outcome on D1, aggregated and final."""
    events_of_every_outcome(D1, admin, server, 9)
    aggregation.run_scheduled(NOW)
    return server


def test_aggregation_fills_each_outcome_column(aggregated):
    row = UsageDaily.objects.get(day=D1)
    assert (row.requests, row.errors, row.quota_rejections, row.blocked) == (28, 2 + 5 + 6, 4, 1)
    assert (row.timeouts, row.upstream_errors, row.client_disconnects) == (5, 6, 7)


def test_api_totals_and_rows_split_every_outcome(aggregated, admin):
    body = admin.client().get(URL, {"start": D1.isoformat(), "group_by": "day,user"}).json()
    totals = body["totals"]
    assert totals["outcomes"] == SPLIT
    assert sum(totals["outcomes"].values()) == totals["requests"] == 28
    # The historical fields are unchanged; the new ones come beside them.
    assert (totals["errors"], totals["quota_rejections"], totals["blocked"]) == (13, 4, 1)
    assert (totals["timeouts"], totals["upstream_errors"], totals["client_disconnects"]) == (5, 6, 7)
    [row] = body["results"]
    assert row["outcomes"] == SPLIT and row["error_rate"] == round(13 / 28, 4)


def test_raw_events_after_the_aggregates_split_the_same_way(admin, server):
    """Today's events after covered_until are read raw by the API: same split as the buckets."""
    aggregation.run_scheduled(NOW)  # today partial, covering events before 11:55
    events_of_every_outcome(TODAY, admin, server, 11, 58)
    for group_by in ("day", "day,user,server,tool"):  # summed tail, and per-bucket raw read
        totals = admin.client().get(URL, {"start": TODAY.isoformat(), "group_by": group_by}).json()["totals"]
        assert totals["outcomes"] == SPLIT, group_by
        assert (totals["timeouts"], totals["upstream_errors"], totals["client_disconnects"]) == (5, 6, 7)


def test_old_buckets_without_the_new_columns_still_add_up(aggregated, admin):
    """Buckets written before the split had only errors: their timeouts count as plain errors."""
    UsageDaily.objects.update(timeouts=0, upstream_errors=0, client_disconnects=0)
    outcomes = admin.client().get(URL, {"start": D1.isoformat()}).json()["totals"]["outcomes"]
    assert outcomes["error"] == 13 and outcomes["timeout"] == 0
    assert sum(outcomes.values()) == 28


def test_outsider_sees_none_of_the_split(aggregated, outsider):
    totals = outsider.client().get(URL, {"start": D1.isoformat()}).json()["totals"]
    assert totals["requests"] == 0 and set(totals["outcomes"].values()) == {0}


def test_csv_export_keeps_its_columns_and_appends_the_split(aggregated, admin):
    response = admin.client().get(EXPORT, {"start": D1.isoformat(), "format": "csv"})
    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == LEGACY_BUCKET_COLUMNS + NEW_COLUMNS
    [values] = rows[1:]
    row = dict(zip(rows[0], values, strict=True))
    assert row["errors"] == "13" and row["requests"] == "28"
    assert {k: int(row[k]) for k in NEW_COLUMNS} == {
        "timeouts": 5, "upstream_errors": 6, "client_disconnects": 7,
        **{f"outcome_{name}": count for name, count in SPLIT.items()}}


def test_json_export_and_list_csv_carry_the_split(aggregated, admin):
    response = admin.client().get(EXPORT, {"start": D1.isoformat(), "format": "json"})
    [row] = json.loads(b"".join(response.streaming_content))
    assert row["outcome_client_disconnect"] == 7 and row["outcome_ok"] == 3 and "outcomes" not in row
    listing = admin.client().get(URL, {"start": D1.isoformat(), "format": "csv", "group_by": "tool"})
    header = next(csv.reader(io.StringIO(b"".join(listing.streaming_content).decode())))
    assert header[-len(NEW_COLUMNS):] == NEW_COLUMNS


# -- the page ------------------------------------------------------------------------------------------------


def test_page_names_every_outcome_for_the_script(admin_web):
    page = admin_web.get("/usage/").content.decode()
    data = page[page.index('id="usage-outcomes-data"'):]
    legend = json.loads(data[data.index(">") + 1:data.index("</script>")])
    assert [o["value"] for o in legend] == ["ok", "error", "timeout", "upstream_error", "quota", "blocked",
                                            "client_disconnect"]
    assert {o["value"] for o in legend} == set(Outcome.values)
    assert f'title="{Outcome.CLIENT_DISCONNECT.label}">Disconnected</th>' in page


def test_drill_down_link_sets_the_filters_from_the_url(admin_web, member, server):
    page = admin_web.get("/usage/", {"user": member.user.pk, "group_by": "tool", "start": "2026-11-01"})
    html = page.content.decode()
    assert page.status_code == 200
    query = html[html.index('data-query="'):].split('"')[1]
    assert f"user={member.user.pk}" in query and "start=2026-11-01" in query
    assert 'data-group-by="tool"' in html and 'id="clear-filters"' in html
    assert f'<option value="{member.user.pk}" selected>' in html


def test_a_stale_filter_in_a_link_keeps_the_others(admin_web, member):
    """A server deleted since the link was made: its field says so, the period still applies."""
    page = admin_web.get("/usage/", {"server": "00000000-0000-0000-0000-000000000000", "start": "2026-11-01",
                                     "end": "2026-11-10"}).content.decode()
    query = page[page.index('data-query="'):].split('"')[1]
    assert "start=2026-11-01" in query and "end=2026-11-10" in query and "server=" not in query
    assert 'id="id_server_error"' in page


def test_member_page_stays_their_own_whatever_the_link(member_web, admin, member):
    page = member_web.get("/usage/", {"user": admin.user.pk}).content.decode()
    query = page[page.index('data-query="'):].split('"')[1]
    assert f"user={member.user.pk}" in query and f"user={admin.user.pk}" not in query
    assert 'id="quota-link"' not in page


def test_outsider_gets_no_usage_of_the_workspace(outsider_web, admin, aggregated):
    page = outsider_web.get("/usage/", {"user": admin.user.pk}).content.decode()
    assert f"user={admin.user.pk}" not in page.split('data-query="')[1].split('"')[0]
