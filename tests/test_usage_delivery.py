"""Usage export pipelines: finalised days delivered by the scheduler to files (Parquet and JSON
Lines, read back with pyarrow) and to a real ClickHouse 18.16 on loopback, exactly once through
retries, kills and re-aggregation; failures retried with backoff and visible to operators."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import time_machine
from django.core.management import CommandError, call_command

from tests.clickhouse_server import PASSWORD, USER
from tests.mcp_peers import reserve_port
from tests.test_usage_aggregation import at, ev, make_server, store
from usage import aggregation, delivery, destinations, export_rows
from usage.export_files import arrow_schema, arrow_type
from usage.export_schema import COLUMNS
from usage.models import DeliveryState, ExportDelivery, ExportLevel, UsageDayState, UsageEvent

D1, D2 = date(2026, 11, 18), date(2026, 11, 19)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PSEUDONYM = re.compile(r"^u_[0-9a-f]{16}$")


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture
def server(admin):
    return make_server(admin)


@pytest.fixture
def usage(clock, admin, member, server):
    admin.user.email = "alice@example.com"
    admin.user.save()
    store(ev(at(D1, 1), admin, server), ev(at(D1, 2, micro=250_000), member, server, tool="fetch"),
          ev(at(D1, 3), admin, server, outcome="error"), ev(at(D2, 1), admin, server))
    aggregation.run_scheduled(NOW)


def files_destination(tmp_path: Path, **fields) -> object:
    fields.setdefault("start_day", D1)
    return destinations.destination_create(name=fields.pop("name", "lake"), kind="files",
                                           directory=str(tmp_path / "lake"), **fields)


def clickhouse_destination(clickhouse, **fields) -> object:
    fields.setdefault("start_day", D1)
    fields.setdefault("url", clickhouse.url)
    return destinations.destination_create(name=fields.pop("name", "warehouse"), kind="clickhouse",
                                           username=USER, password=PASSWORD, **fields)


def parquet_rows(tmp_path: Path, table: str, day: date) -> list[dict]:
    return pq.read_table(tmp_path / "lake" / "parquet" / table / f"day={day}" / "part-0.parquet").to_pylist()


def jsonl_bytes(tmp_path: Path, table: str, day: date) -> bytes:
    return (tmp_path / "lake" / "jsonl" / table / f"day={day}" / "part-0.jsonl").read_bytes()


# -- files -----------------------------------------------------------------------------------------------


def test_scheduler_delivers_each_final_day_as_parquet_and_json_lines_once(usage, tmp_path, clock):
    destination = files_destination(tmp_path)
    results = delivery.run_scheduled(NOW)
    assert [(r.day, r.state, r.rows) for r in results] == [(D1, "delivered", 2), (D2, "delivered", 1)]

    table = pq.read_table(tmp_path / "lake" / "parquet" / "usage_daily" / f"day={D1}" / "part-0.parquet")
    assert table.schema == arrow_schema(ExportLevel.DAILY)
    rows = sorted(table.to_pylist(), key=lambda r: r["tool"])
    assert [(r["day"], r["tool"], r["requests"], r["errors"]) for r in rows] == [
        (D1, "fetch", 1, 0), (D1, "search", 2, 1)]
    assert all(PSEUDONYM.match(r["user_id"]) and r["username"] is None and r["email"] is None for r in rows)
    assert rows[0]["first_at"] == at(D1, 2, micro=250_000)
    lines = [json.loads(line) for line in jsonl_bytes(tmp_path, "usage_daily", D1).splitlines()]
    assert list(lines[0]) == [c.name for c in COLUMNS[ExportLevel.DAILY]]
    assert sorted((r["tool"], r["user_id"], r["requests"]) for r in lines) == [
        (r["tool"], r["user_id"], r["requests"]) for r in rows]
    fetch = next(line for line in lines if line["tool"] == "fetch")
    assert fetch["first_at"] == "2026-11-18T02:00:00.250000Z" and fetch["day"] == "2026-11-18"

    record = ExportDelivery.objects.get(destination=destination, day=D1)
    assert (record.state, record.rows, record.attempts, record.failures) == ("delivered", 2, 1, 0)
    assert record.checksum == hashlib.sha256(jsonl_bytes(tmp_path, "usage_daily", D1)).hexdigest()
    assert record.source_filled_at == UsageDayState.objects.get(day=D1).filled_at

    # Read as one Hive-partitioned dataset, the way a warehouse sees the directory.
    dataset = ds.dataset(tmp_path / "lake" / "parquet" / "usage_daily", format="parquet",
                         partitioning=ds.partitioning(pa.schema([pa.field("day", pa.date32())]), flavor="hive"))
    assert sorted(r["day"] for r in dataset.to_table().to_pylist()) == [D1, D1, D2]

    schema = json.loads((tmp_path / "lake" / "_schema" / "usage_daily.bigquery.json").read_text())
    assert schema[0] == {"name": "day", "type": "DATE", "mode": "REQUIRED"}
    assert [f["name"] for f in schema] == table.schema.names
    assert sorted(p.name for p in (tmp_path / "lake").iterdir()) == ["_schema", "jsonl", "parquet"]

    clock.shift(timedelta(hours=1))
    assert delivery.run_scheduled() == []  # nothing is delivered twice


def test_identities_are_kept_when_the_destination_says_so(usage, tmp_path, admin):
    files_destination(tmp_path, pseudonymize=False)
    delivery.run_scheduled(NOW)
    rows = parquet_rows(tmp_path, "usage_daily", D1)
    alice = next(r for r in rows if r["username"] == "alice")
    assert alice["user_id"] == str(admin.user.pk) and alice["email"] == "alice@example.com"


def test_events_level_delivers_one_row_per_request(usage, tmp_path, admin):
    files_destination(tmp_path, level="events")
    delivery.run_scheduled(NOW)
    rows = parquet_rows(tmp_path, "usage_events", D1)
    assert pq.read_schema(tmp_path / "lake" / "parquet" / "usage_events" / f"day={D1}" / "part-0.parquet") == \
        arrow_schema(ExportLevel.EVENTS)
    assert [(r["created_at"], r["outcome"], r["api_key_id"]) for r in rows] == [
        (at(D1, 1), "ok", None), (at(D1, 2, micro=250_000), "ok", None), (at(D1, 3), "error", None)]
    assert all(PSEUDONYM.match(r["user_id"]) for r in rows)
    assert len(jsonl_bytes(tmp_path, "usage_events", D1).splitlines()) == 3


def test_a_reaggregated_day_is_delivered_again_and_replaces_the_old_one(usage, tmp_path, admin, server, clock):
    destination = files_destination(tmp_path)
    delivery.run_scheduled(NOW)
    store(ev(at(D1, 23, 59), admin, server, tool="late"))
    clock.shift(timedelta(minutes=5))
    aggregation.aggregate_days(D1, D1)
    results = delivery.run_scheduled()
    assert [(r.day, r.rows) for r in results] == [(D1, 3)]
    assert sorted(r["tool"] for r in parquet_rows(tmp_path, "usage_daily", D1)) == ["fetch", "late", "search"]
    assert len(jsonl_bytes(tmp_path, "usage_daily", D1).splitlines()) == 3
    assert ExportDelivery.objects.get(destination=destination, day=D1).attempts == 2


def test_a_day_not_final_yet_waits_across_midnight(clock, admin, server, tmp_path, settings):
    """Events at 23:59:59 are delivered once the day is finalised after midnight plus the grace."""
    settings.USAGE_FINALIZE_GRACE_SECONDS = 300
    evening = datetime(2026, 11, 19, 23, 59, 59, tzinfo=UTC)
    clock.move_to(evening)
    destination = files_destination(tmp_path, start_day=D2)
    store(ev(evening, admin, server))
    aggregation.run_scheduled()
    assert delivery.run_scheduled() == []
    clock.move_to(datetime(2026, 11, 20, 0, 0, 30, tzinfo=UTC))
    store(ev(evening + timedelta(milliseconds=500), admin, server))  # still being written at midnight
    aggregation.run_scheduled()
    assert delivery.run_scheduled() == []
    assert delivery.destinations_status()[0].lag_days == 1
    clock.move_to(datetime(2026, 11, 20, 0, 6, tzinfo=UTC))
    aggregation.run_scheduled()
    assert [(r.day, r.rows) for r in delivery.run_scheduled()] == [(D2, 1)]
    assert parquet_rows(tmp_path, "usage_daily", D2)[0]["requests"] == 2
    assert delivery.destinations_status()[0].lag_days == 0
    assert destination.deliveries.get().state == "delivered"


def test_a_delivery_that_dies_half_way_leaves_the_previous_day_whole(usage, tmp_path, monkeypatch):
    destination = files_destination(tmp_path)
    delivery.deliver_day(destination, D1)
    before = {p: p.read_bytes() for p in (tmp_path / "lake").rglob("part-0.*")}
    partition = tmp_path / "lake" / "parquet" / "usage_daily" / f"day={D1}"
    (partition / ".part-0.parquet.4242-deadbeef.tmp").write_bytes(b"left by a killed worker")

    def dies_after_a_batch(level, day, *, pseudonymize):
        rows = list(export_rows.day_rows(level, day, pseudonymize=pseudonymize))
        yield rows[0]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_rows, "BATCH_ROWS", 1)
    monkeypatch.setattr(delivery, "day_rows", dies_after_a_batch)
    result = delivery.deliver_day(destination, D1, force=True)
    assert (result.state, result.detail) == ("failed", "No space left on device")
    assert {p: p.read_bytes() for p in (tmp_path / "lake").rglob("part-0.*")} == before
    assert [p.name for p in partition.iterdir()] == ["part-0.parquet"]  # no temporary file left

    monkeypatch.undo()
    assert delivery.deliver_day(destination, D1, force=True).state == "delivered"
    assert {p: p.read_bytes() for p in (tmp_path / "lake").rglob("part-0.*")} == before


def test_an_unwritable_directory_is_a_failure_retried_with_backoff(usage, tmp_path, clock, settings):
    settings.USAGE_EXPORT_RETRY_SECONDS = 60
    (tmp_path / "lake").write_text("a file, not a directory")
    destination = files_destination(tmp_path, start_day=D2)
    [result] = delivery.run_scheduled()
    assert result.state == "failed" and str(tmp_path / "lake") in result.detail
    record = destination.deliveries.get()
    assert (record.failures, record.next_attempt_at) == (1, NOW + timedelta(seconds=60))
    clock.shift(timedelta(seconds=59))
    assert delivery.run_scheduled() == []
    clock.shift(timedelta(seconds=1))
    assert [r.state for r in delivery.run_scheduled()] == ["failed"]
    record.refresh_from_db()
    assert (record.failures, record.attempts) == (2, 2)
    assert record.next_attempt_at == NOW + timedelta(seconds=60 + 120)
    (tmp_path / "lake").unlink()
    clock.shift(timedelta(seconds=120))
    assert [r.state for r in delivery.run_scheduled()] == ["delivered"]
    record.refresh_from_db()
    assert (record.state, record.last_error, record.failures, record.next_attempt_at) == ("delivered", "", 2, None)


def test_retry_delay_doubles_up_to_the_maximum(settings):
    settings.USAGE_EXPORT_RETRY_SECONDS, settings.USAGE_EXPORT_RETRY_MAX_SECONDS = 60, 600
    assert [delivery.retry_delay(n).total_seconds() for n in (1, 2, 3, 4, 5)] == [60, 120, 240, 480, 600]


# -- leases and fencing ---------------------------------------------------------------------------------


def test_a_live_lease_keeps_other_workers_off_and_a_dead_one_is_taken_over(usage, tmp_path, clock, settings):
    settings.USAGE_EXPORT_LEASE_SECONDS = 600
    destination = files_destination(tmp_path, start_day=D2)
    claimed = delivery._claim(destination, D2, now=NOW, force=False)
    assert claimed is not None
    assert delivery.deliver_day(destination, D2, force=True).state == "skipped"
    assert delivery.run_scheduled() == []
    clock.shift(timedelta(seconds=601))  # the first worker died without renewing
    assert [r.state for r in delivery.run_scheduled()] == ["delivered"]
    # The dead attempt's late result cannot overwrite the newer one.
    first_attempt, _ = claimed
    assert delivery._record(first_attempt, state=DeliveryState.FAILED, last_error="late") is False
    record = destination.deliveries.get()
    assert (record.state, record.attempts, record.last_error) == ("delivered", 2, "")


def test_events_of_a_purged_day_are_unavailable_while_its_aggregates_still_go(usage, tmp_path):
    UsageDayState.objects.filter(day=D1).update(raw_purged_at=NOW)
    UsageEvent.objects.filter(created_at__date=D1).delete()
    events = files_destination(tmp_path, level="events", name="events")
    daily = files_destination(tmp_path / "daily")
    results = {(r.destination, r.day): r for r in delivery.run_scheduled(NOW)}
    assert results["events", D1].state == "unavailable" and "purged" in results["events", D1].detail
    assert results["lake", D1].rows == 2
    assert delivery.run_scheduled(NOW) == []
    assert {s.destination.name: s.lag_days for s in delivery.destinations_status()} == {"events": 0, "lake": 0}
    assert events.deliveries.get(day=D1).state == "unavailable" and daily.deliveries.count() == 2


# -- ClickHouse -------------------------------------------------------------------------------------------


def ch_count(clickhouse, table: str, day: date) -> int:
    return int(clickhouse.query(f"SELECT count() FROM twinmcp.{table} WHERE day = '{day}'"))


@pytest.fixture
def fresh_clickhouse(clickhouse):
    clickhouse.query("DROP DATABASE IF EXISTS twinmcp")
    yield clickhouse
    clickhouse.query("DROP DATABASE IF EXISTS twinmcp")


def test_clickhouse_gets_each_day_once_in_a_table_partitioned_by_day(usage, fresh_clickhouse, tmp_path):
    ch = fresh_clickhouse
    destination = clickhouse_destination(ch, level="events")
    assert [(r.day, r.state, r.rows) for r in delivery.run_scheduled(NOW)] == [(D1, "delivered", 3),
                                                                                (D2, "delivered", 1)]
    assert (ch_count(ch, "usage_events", D1), ch_count(ch, "usage_events", D2)) == (3, 1)
    assert ch.rows("SELECT partition, sum(rows) FROM system.parts WHERE database = 'twinmcp' AND "
                   "table = 'usage_events' AND active GROUP BY partition ORDER BY partition") == [
        ["2026-11-18", "3"], ["2026-11-19", "1"]]
    assert ch.rows("SELECT toString(created_at), outcome, counted FROM twinmcp.usage_events "
                   f"WHERE day = '{D1}' ORDER BY created_at") == [
        ["2026-11-18 01:00:00", "ok", "1"], ["2026-11-18 02:00:00", "ok", "1"], ["2026-11-18 03:00:00", "error", "0"]]
    for _ in range(2):  # delivered again on demand: replaced, never duplicated
        assert [r.state for r in delivery.deliver_range([destination], D1, D2)] == ["delivered", "delivered"]
    assert (ch_count(ch, "usage_events", D1), ch_count(ch, "usage_events", D2)) == (3, 1)
    assert ch.rows("SHOW TABLES FROM twinmcp") == [["usage_events"]]  # no staging table left
    files_destination(tmp_path, level="events")
    delivery.run_scheduled(NOW)
    assert destination.deliveries.get(day=D1).checksum == hashlib.sha256(
        jsonl_bytes(tmp_path, "usage_events", D1)).hexdigest()


def test_clickhouse_daily_aggregates_with_identities(usage, fresh_clickhouse, admin):
    ch = fresh_clickhouse
    clickhouse_destination(ch, pseudonymize=False, table="billing_daily", database="analytics")
    delivery.run_scheduled(NOW)
    rows = ch.rows("SELECT user_id, username, tool, requests, errors FROM analytics.billing_daily "
                   f"WHERE day = '{D1}' ORDER BY tool")
    assert rows[1] == [str(admin.user.pk), "alice", "search", "2", "1"]
    ch.query("DROP DATABASE analytics")


def test_a_crash_after_the_swap_before_the_record_is_delivered_again_without_duplicates(usage, fresh_clickhouse):
    ch = fresh_clickhouse
    destination = clickhouse_destination(ch, level="events")
    rows = export_rows.DayRows(export_rows.day_rows("events", D1, pseudonymize=True))
    destinations.sink_for(destination).deliver(D1, "events", rows)  # the record was never written
    assert ch_count(ch, "usage_events", D1) == 3
    delivery.run_scheduled(NOW)
    assert ch_count(ch, "usage_events", D1) == 3


class Relay:
    """A TCP relay in front of ClickHouse that forwards an INSERT's first bytes, then holds the
    rest: the delivery is then certainly mid-insert, however fast or slow the machine."""

    def __init__(self, target_port: int, hold_after: int) -> None:
        self.target_port = target_port
        self.hold_after = hold_after
        self.holding = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, request: bool) -> None:
        seen, inserting, held = 0, False, False
        try:
            while data := source.recv(65536):
                if held:
                    continue  # read and dropped: nothing more reaches ClickHouse
                if request:
                    inserting = inserting or b"INSERT" in data[:2048]
                    if inserting and seen + len(data) > self.hold_after:
                        target.sendall(data[: max(self.hold_after - seen, 0)])
                        held = True
                        self.holding.set()
                        continue
                    seen += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:  # one side gone (the killed worker): so is the other, as without a relay
            for s in (source, target):
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_insert_is_retried_with_no_duplicate_rows(fresh_clickhouse, admin, member, server,
                                                                    settings):
    from django.db import connection

    ch = fresh_clickhouse
    day = date(2026, 11, 18)
    events = [ev(at(day, 1) + timedelta(milliseconds=i), admin, server) for i in range(30_000)]
    for number, event in enumerate(events):
        event.request_id = f"r{number}"
    store(*events)
    with time_machine.travel(NOW, tick=False):
        aggregation.run_scheduled(NOW)
    relay = Relay(ch.http_port, hold_after=400_000)
    destination = clickhouse_destination(ch, level="events", url=f"http://127.0.0.1:{relay.port}", start_day=day,
                                         name="killed")
    db = connection.settings_dict
    env = {**os.environ, "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "LOG_LEVEL": "WARNING", "DEBUG": "false"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = subprocess.Popen([sys.executable, "manage.py", "deliver_usage", "--day", str(day)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert relay.holding.wait(timeout=120), "the delivery never reached the INSERT"
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        relay.close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    record = destination.deliveries.get(day=day)
    assert record.state == "running" and record.attempts == 1  # as the killed worker left it
    assert ch.query("EXISTS TABLE twinmcp.usage_events__staging_20261118").strip() == "1"
    assert int(ch.query("SELECT count() FROM twinmcp.usage_events")) == 0

    settings.USAGE_EXPORT_LEASE_SECONDS = 600
    destinations.destination_update(destination=destination, url=ch.url)  # the worker's address, now direct
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=601), tick=False):
        results = delivery.run_scheduled()
    assert (results[0].day, results[0].state, results[0].rows) == (day, "delivered", 30_000)
    assert ch_count(ch, "usage_events", day) == 30_000
    assert int(ch.query("SELECT uniqExact(request_id) FROM twinmcp.usage_events")) == 30_000
    assert ch.rows("SHOW TABLES FROM twinmcp") == [["usage_events"]]


def test_clickhouse_down_is_failed_retried_and_seen_by_operators(usage, clickhouse, clock, settings):
    settings.USAGE_EXPORT_RETRY_SECONDS = 60
    hole = reserve_port()
    try:
        destination = clickhouse_destination(clickhouse, url=f"http://127.0.0.1:{hole.getsockname()[1]}",
                                             start_day=D2)
        [result] = delivery.run_scheduled()
        assert result.state == "failed" and "cannot talk to ClickHouse at 127.0.0.1" in result.detail
        [status] = delivery.destinations_status()
        assert (status.lag_days, status.failing_days, status.failures) == (1, 1, 1)
        clock.shift(timedelta(days=1))
        [status] = delivery.destinations_status()
        assert status.lag_days == 2 and status.oldest_pending == D2
        with time_machine.travel(NOW + timedelta(days=3), tick=False):  # aggregation stopped too: still behind
            [status] = delivery.destinations_status()
            assert status.lag_days == 4 and status.oldest_pending == D2
        destinations.destination_update(destination=destination, url=clickhouse.url, database="downtest")
        assert [r.state for r in delivery.run_scheduled()] == ["delivered"]
    finally:
        hole.close()
        clickhouse.query("DROP DATABASE IF EXISTS downtest")


def test_clickhouse_refusing_the_password_names_the_error_not_the_secret(usage, clickhouse):
    destination = clickhouse_destination(clickhouse, start_day=D2)
    destinations.destination_set_password(destination=destination, password="wrong-password")
    [result] = delivery.run_scheduled()
    assert result.state == "failed" and re.search(r"answered HTTP [45]\d\d: .*(password|Authentication)", result.detail)
    assert "wrong-password" not in result.detail and PASSWORD not in result.detail
    assert destination.password_ciphertext.startswith("v1.") and "wrong" not in destination.password_ciphertext


# -- the documented loading commands ------------------------------------------------------------------------


def test_the_documented_clickhouse_commands_load_the_json_lines_files_once(usage, tmp_path, fresh_clickhouse):
    ch = fresh_clickhouse
    files_destination(tmp_path, level="events")
    delivery.run_scheduled(NOW)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "usage-exports.md").read_text()
    commands = re.findall(r"```sh\n(clickhouse-client [^\n]*)\n```", doc)
    assert len(commands) == 3
    for _ in range(2):  # loading a day again replaces it
        for command in commands:
            command = command.replace("clickhouse-client", f"clickhouse-client --port {ch.tcp_port}", 1)
            command = command.replace("/srv/twinmcp-usage", str(tmp_path / "lake")).replace("2026-11-30", str(D1))
            subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    assert ch_count(ch, "usage_events", D1) == len(jsonl_bytes(tmp_path, "usage_events", D1).splitlines()) == 3
    assert ch.rows(f"SELECT toString(created_at), user_id FROM twinmcp.usage_events WHERE day = '{D1}' "
                   "ORDER BY created_at")[1][0] == "2026-11-18 02:00:00"


def test_the_documented_columns_are_the_delivered_ones():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "usage-exports.md").read_text()
    for level, heading in ((ExportLevel.DAILY, "### Daily level"), (ExportLevel.EVENTS, "### Events level")):
        section = doc.split(heading, 1)[1].split("\n#", 1)[0]
        documented = re.findall(r"^\| `(\w+)` \| ([^|]+) \| (\w+) \| ([^|]+) \|", section, re.MULTILINE)
        delivered = [(c.name, str(arrow_type(c)).replace("[day]", "").replace("tz=", ""), c.bigquery, c.clickhouse)
                     for c in COLUMNS[level]]
        assert [(n, a.strip(), b, c.strip()) for n, a, b, c in documented] == delivered


# -- the command --------------------------------------------------------------------------------------------


def run_command(*args: str) -> str:
    out = io.StringIO()
    call_command("deliver_usage", *args, stdout=out)
    return out.getvalue()


def test_command_redelivers_a_range_and_prints_the_status(usage, tmp_path):
    files_destination(tmp_path)
    output = run_command("--since", "2026-11-18", "--until", "2026-11-20")
    assert output.splitlines() == ["lake 2026-11-18: delivered, 2 rows", "lake 2026-11-19: delivered, 1 rows",
                                   "lake 2026-11-20: skipped (not finalised yet)"]
    assert "lake (files, daily): lag 0 day(s)" in run_command("--status")


@pytest.mark.parametrize(("args", "message"), [
    ([], "Give --day YYYY-MM-DD, --since YYYY-MM-DD or --status."),
    (["--day", "2026-11-18", "--destination", "nope"], "--destination: no destination named nope."),
    (["--day", "2026-11-18", "--until", "2026-11-19"], "--until goes with --since."),
    (["--since", "2026-11-18", "--until", "2026-11-17"], "--until: 2026-11-17 is before --since 2026-11-18."),
    (["--day", "2026-13-01"], "--day: '2026-13-01' is not a date"),
])
def test_command_bad_arguments_are_one_line(usage, tmp_path, args, message):
    files_destination(tmp_path)
    with pytest.raises(CommandError, match=re.escape(message)):
        run_command(*args)


def test_command_fails_when_a_delivery_failed(usage, tmp_path):
    (tmp_path / "lake").write_text("not a directory")
    files_destination(tmp_path)
    with pytest.raises(CommandError, match="2 delivery"):
        run_command("--since", "2026-11-18", "--until", "2026-11-19")


def test_days_aggregation_never_reached_count_in_the_lag(usage, tmp_path, clock):
    files_destination(tmp_path)
    delivery.run_scheduled()
    assert delivery.destinations_status()[0].lag_days == 0
    clock.shift(timedelta(days=4))  # beat stopped: no state row for 11-21…11-23
    UsageDayState.objects.filter(day=date(2026, 11, 20)).delete()
    [status] = delivery.destinations_status()
    assert (status.lag_days, status.oldest_pending) == (4, date(2026, 11, 20))


def test_a_table_of_another_shape_is_a_failure_with_clickhouses_reason(usage, fresh_clickhouse):
    ch = fresh_clickhouse
    ch.query("CREATE DATABASE twinmcp")
    ch.query("CREATE TABLE twinmcp.usage_daily (day Date, other UInt8) ENGINE = MergeTree PARTITION BY day "
             "ORDER BY day")
    destination = clickhouse_destination(ch, start_day=D1)
    result = delivery.deliver_day(destination, D1)
    assert result.state == "failed" and "answered HTTP" in result.detail and "workspace" in result.detail
    assert int(ch.query("SELECT count() FROM twinmcp.usage_daily")) == 0
