"""Exports: streamed with constant memory (WSGI and ASGI), CSV formula injection neutralised,
pseudonyms stable within a workspace and unlinkable across workspaces, and the export_usage command."""

from __future__ import annotations

import csv
import io
import json
import re
import tracemalloc
from datetime import UTC, date, datetime

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connections
from django.http import StreamingHttpResponse
from django.test import AsyncClient

from tests.conftest import make_actor
from tests.test_usage_aggregation import at, ev, make_server, store
from twinmcp import services as core
from twinmcp.flags import flag_enable_for_workspace
from twinmcp.models import Role
from usage import aggregation, exports
from usage.exports import Pseudonymizer, csv_cell

URL = "/api/v1/external-mcp/usage/export"
D1, D2 = date(2026, 11, 18), date(2026, 11, 19)
TODAY = date(2026, 11, 21)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PSEUDONYM = re.compile(r"^u_[0-9a-f]{16}$")
HOSTILE = ["=HYPERLINK(\"http://evil\",\"x\")", "+SUM(1,2)", "-2+3", "@cmd", "\tTAB", "\rCR"]


@pytest.fixture(autouse=True)
def _frozen():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def server(admin):
    return make_server(admin)


@pytest.fixture
def usage(admin, member, server, flag_on):
    for actor in (admin, member):
        actor.user.email = f"{actor.user.username}@example.com"
        actor.user.save()
    store(ev(at(D1, 1), admin, server), ev(at(D1, 2), member, server, tool="fetch"),
          ev(at(D2, 1), admin, server), ev(at(TODAY, 1), member, server))
    aggregation.run_scheduled(NOW)


def body(response) -> str:
    assert isinstance(response, StreamingHttpResponse)
    return b"".join(response.streaming_content).decode()


def export(actor, **params):
    return actor.client().get(URL, params)


# -- formats ----------------------------------------------------------------------------------------------


def test_csv_export_of_buckets(usage, admin, server):
    response = export(admin)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="twinmcp-usage-2026-10-23-2026-11-21.csv"'
    rows = list(csv.DictReader(io.StringIO(body(response))))
    assert [(r["day"], r["username"], r["tool"], r["requests"]) for r in rows] == [
        ("2026-11-18", "alice", "search", "1"), ("2026-11-18", "bob", "fetch", "1"),
        ("2026-11-19", "alice", "search", "1"), ("2026-11-21", "bob", "search", "1")]
    assert rows[0]["server_id"] == str(server.pk) and rows[0]["email"] == "alice@example.com"
    assert rows[0]["latency_p95_ms"] == "10.0"


def test_json_array_and_json_lines(usage, admin):
    response = export(admin, format="json", group_by="day")
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith('.json"')
    rows = json.loads(body(response))
    assert [(r["day"], r["requests"]) for r in rows] == [("2026-11-18", 2), ("2026-11-19", 1), ("2026-11-21", 1)]

    response = export(admin, format="jsonl", level="event")
    assert response["Content-Type"] == "application/x-ndjson"
    lines = body(response).splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 4 and events[0]["created_at"] == "2026-11-18T01:00:00Z"
    assert events[0]["username"] == "alice" and events[0]["tool"] == "search"


def test_empty_exports_are_well_formed(usage, admin):
    assert json.loads(body(export(admin, format="json", start="2026-01-01", end="2026-01-02"))) == []
    assert body(export(admin, format="jsonl", start="2026-01-01", end="2026-01-02")) == ""
    assert body(export(admin, start="2026-01-01", end="2026-01-02")).startswith("workspace,day,user_id,")


def test_export_respects_permissions_and_filters(usage, member, outsider):
    rows = list(csv.DictReader(io.StringIO(body(export(member, level="event")))))
    assert {r["username"] for r in rows} == {"bob"}
    assert export(member, user="alice").status_code == 403
    assert body(export(outsider)).count("\n") == 1  # header only
    assert export(outsider, format="xml").json() == {"format": ["Choose one of csv, json, jsonl."]}
    assert list(export(outsider, level="raw").json()) == ["level"]


# -- CSV injection ------------------------------------------------------------------------------------------


def test_csv_neutralises_formula_injection(usage, admin, server, django_user_model):
    mallory = make_actor(django_user_model, "-mallory", admin.workspace, Role.MEMBER)
    store(*(ev(at(TODAY, 2), mallory, server, tool=name) for name in HOSTILE))
    text = body(export(admin, start="2026-11-21", end="2026-11-21"))
    rows = list(csv.DictReader(io.StringIO(text)))
    tools = {r["tool"] for r in rows if r["username"] == "'-mallory"}
    assert tools == {"'" + name for name in HOSTILE}
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    events = list(csv.DictReader(io.StringIO(body(export(admin, level="event", start="2026-11-21")))))
    assert {r["tool"] for r in events if r["username"] == "'-mallory"} == {"'" + name for name in HOSTILE}


def test_csv_cell_leaves_numbers_and_safe_text_alone():
    assert csv_cell(-32600) == -32600
    assert csv_cell(1.5) == 1.5
    assert csv_cell(None) == "" and csv_cell(True) == "true"
    assert csv_cell("search") == "search" and csv_cell("a=b") == "a=b"


# -- pseudonymisation ---------------------------------------------------------------------------------------


def test_pseudonyms_hide_identity_and_are_stable_within_a_workspace(usage, admin, member):
    first = export(admin, pseudonymize="true", level="event", format="jsonl")
    text = body(first)
    for secret in ("alice", "bob", "example.com", str(admin.key.pk), str(member.key.pk)):
        assert secret not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert all(PSEUDONYM.match(e["user_id"]) for e in events)
    assert all(e["username"] is None and e["email"] is None and e["api_key_id"] is None for e in events)

    buckets = list(csv.DictReader(io.StringIO(body(export(admin, pseudonymize="true")))))
    assert "alice" not in str(buckets) and "example.com" not in str(buckets)
    again = list(csv.DictReader(io.StringIO(body(export(admin, pseudonymize="true")))))
    assert [r["user_id"] for r in again] == [r["user_id"] for r in buckets]
    alice = Pseudonymizer().user(admin.workspace.pk, admin.user.pk)
    bob = Pseudonymizer().user(admin.workspace.pk, member.user.pk)
    assert alice != bob
    assert {r["user_id"] for r in buckets} == {alice, bob}
    assert {e["user_id"] for e in events} == {alice, bob}


def test_pseudonyms_differ_across_workspaces(usage, admin, outsider):
    core.member_add(workspace=outsider.workspace, user=admin.user, role=Role.MEMBER)
    key, raw = core.api_key_create(user=admin.user, workspace=outsider.workspace, name="globex")
    flag_enable_for_workspace(workspace=outsider.workspace)
    store(ev(at(TODAY, 3), admin, make_server(outsider, "g1"), workspace=outsider.workspace))
    from tests.conftest import Actor

    in_globex = Actor(user=admin.user, workspace=outsider.workspace, key=key, raw_key=raw)
    globex_rows = json.loads(body(export(in_globex, pseudonymize="true", format="json", start="2026-11-21")))
    acme_rows = json.loads(body(export(admin, pseudonymize="true", format="json", user="alice")))
    assert len(globex_rows) == 1 and globex_rows[0]["workspace"] == "globex"
    assert {r["user_id"] for r in acme_rows} == {Pseudonymizer().user(admin.workspace.pk, admin.user.pk)}
    assert globex_rows[0]["user_id"] != acme_rows[0]["user_id"]


def test_pseudonyms_depend_on_the_secret_key(settings):
    workspace = "6f1c0a55-7a9e-4c1e-9d7e-2b4f8e0d1a11"
    settings.SECRET_KEY = "one"
    one = Pseudonymizer().user(workspace, 42)
    assert one == Pseudonymizer().user(workspace, 42) and PSEUDONYM.match(one)
    settings.SECRET_KEY = "two"
    assert Pseudonymizer().user(workspace, 42) != one
    assert Pseudonymizer().user(workspace, None) is None


# -- constant memory ----------------------------------------------------------------------------------------


def peak_while_streaming(response) -> tuple[int, int]:
    """(rows, peak bytes allocated) while consuming a streamed response chunk by chunk."""
    tracemalloc.start()
    try:
        lines = 0
        for chunk in response.streaming_content:
            lines += chunk.count(b"\n")
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("level", ["event", "bucket"])
def test_export_memory_does_not_grow_with_rows(admin, server, flag_on, level):
    def add(start: int, count: int) -> None:
        store(*(ev(at(D1, 0, 0, 0, 0), admin, server, tool=f"t{start + i:06d}") for i in range(count)))
        aggregation.aggregate_day(D1, final=True)

    client = admin.client()
    params = {"level": level, "start": "2026-11-18", "end": "2026-11-18"}
    add(0, 2_000)
    client.get(URL, params)  # warm-up: imports, caches
    small_rows, small_peak = peak_while_streaming(client.get(URL, params))
    add(2_000, 18_000)
    large_rows, large_peak = peak_while_streaming(client.get(URL, params))
    assert (small_rows, large_rows) == (2_001, 20_001)
    # Ten times the rows, about the same memory: one fetch of CHUNK_ROWS rows at a time.
    assert large_peak < small_peak * 1.5 + 512 * 1024, (small_peak, large_peak)


@pytest.mark.django_db(transaction=True)
async def test_asgi_export_streams_through_an_async_iterator(django_user_model):
    from asgiref.sync import sync_to_async

    @sync_to_async
    def setup():
        workspace = core.workspace_create(slug="asgi", name="ASGI")
        flag_enable_for_workspace(workspace=workspace)
        actor = make_actor(django_user_model, "ada", workspace, Role.ADMIN)
        server = make_server(actor, "a1")
        store(*(ev(at(TODAY, 1, 0, 0, i), actor, server) for i in range(1_200)))
        return actor

    actor = await setup()
    response = await AsyncClient().get(URL, {"level": "event", "start": "2026-11-21"},
                                       headers={"authorization": f"Bearer {actor.raw_key}"})
    assert response.status_code == 200, response.content
    assert response.is_async  # Django would buffer a sync iterator whole under ASGI
    chunks = [chunk async for chunk in response.streaming_content]
    # The test client keeps the view thread's connection open (it never sends request_finished to
    # close_old_connections): close it, or it outlives the test and blocks dropping the database.
    await sync_to_async(connections.close_all)()
    assert len(chunks) > 2  # FLUSH_ROWS rows at a time
    assert b"".join(chunks).count(b"\n") == 1_201


# -- the export_usage command -------------------------------------------------------------------------------


def run_export(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("export_usage", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def test_export_command_writes_pseudonymised_files_per_day(usage, tmp_path, admin):
    output = run_export("--since", "2026-11-18", "--out", str(tmp_path / "out"))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["usage-2026-11-18.csv", "usage-2026-11-18.jsonl", "usage-2026-11-19.csv",
                     "usage-2026-11-19.jsonl", "usage-2026-11-20.csv", "usage-2026-11-20.jsonl"]
    assert "skipped 2026-11-21: not finalised yet" in output
    text = (tmp_path / "out" / "usage-2026-11-18.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 and all(PSEUDONYM.match(r["user_id"]) for r in rows)
    assert "alice" not in text and "example.com" not in text
    lines = (tmp_path / "out" / "usage-2026-11-18.jsonl").read_text().splitlines()
    assert [json.loads(line)["user_id"] for line in lines] == [r["user_id"] for r in rows]
    assert (tmp_path / "out" / "usage-2026-11-20.csv").read_text().count("\n") == 1  # header only


def test_export_command_identities_format_and_workspace(usage, tmp_path):
    run_export("--day", "2026-11-18", "--out", str(tmp_path), "--format", "csv", "--no-pseudonymize",
               "--workspace", "acme")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage-2026-11-18.csv"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "usage-2026-11-18.csv").read_text())))
    assert {r["username"] for r in rows} == {"alice", "bob"}
    run_export("--day", "2026-11-18", "--out", str(tmp_path), "--format", "jsonl", "--workspace", "globex")
    assert (tmp_path / "usage-2026-11-18.jsonl").read_text() == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--day", "2026-11-31"], "--day: '2026-11-31' is not a date"),
    ([], "Give --day YYYY-MM-DD or --since YYYY-MM-DD."),
    (["--day", "2026-11-21"], "No finalised day between 2026-11-21 and 2026-11-21"),
    (["--day", "2026-11-18", "--workspace", "nope"], "--workspace: no workspace 'nope'."),
])
def test_export_command_bad_arguments(usage, tmp_path, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run_export(*args, "--out", str(tmp_path))


def test_export_command_out_must_be_a_directory(usage, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CommandError, match="--out: cannot use"):
        run_export("--day", "2026-11-18", "--out", str(target))


def test_writers_flush_in_chunks():
    rows = ({"a": i} for i in range(exports.FLUSH_ROWS * 2 + 1))
    assert len(list(exports.jsonl_chunks(rows))) == 3
    assert json.loads(b"".join(exports.json_array_chunks({"a": i} for i in range(3)))) == [{"a": 0}, {"a": 1},
                                                                                             {"a": 2}]
