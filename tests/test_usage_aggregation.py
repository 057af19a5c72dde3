"""Daily usage aggregation: correctness against hand-computed figures, idempotence, interrupted
runs, UTC day boundaries, missed days, the operator command and the beat task."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command

from external_mcp import services as server_services
from usage import aggregation, tasks
from usage.models import DayState, UsageDaily, UsageDayState, UsageEvent
from usage.queries import percentile_cont

D1 = date(2026, 11, 18)
D2 = date(2026, 11, 19)
D3 = date(2026, 11, 20)


def at(day: date, hour: int = 12, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, micro, tzinfo=UTC)


def ev(when: datetime, actor, server, *, tool: str = "search", method: str = "tools/call", latency: float = 10.0,
       outcome: str = "ok", counted: bool | None = None, tokens_in: int = 1, tokens_out: int = 2, bytes_in: int = 10,
       bytes_out: int = 20, workspace=None) -> UsageEvent:
    return UsageEvent(
        created_at=when, user_id=actor.user.pk, workspace_id=(workspace or actor.workspace).pk,
        server_id=server.pk if server else None, api_key_id=actor.key.pk, method=method,
        tool_name=tool, jsonrpc_id="1", request_id="r", tokens_in=tokens_in, tokens_out=tokens_out,
        bytes_in=bytes_in, bytes_out=bytes_out, latency_ms=latency, outcome=outcome,
        counted=(method == "tools/call" and outcome == "ok") if counted is None else counted,
    )


def store(*events: UsageEvent) -> None:
    UsageEvent.objects.bulk_create(events)


def make_server(actor, name: str = "s1"):
    return server_services.server_create(workspace=actor.workspace, actor=actor.user, name=name,
                                         base_url="https://93.184.215.14/mcp")


FIELDS = ("day", "workspace_id", "user_id", "server_id", "tool", "requests", "counted", "errors", "quota_rejections",
          "blocked", "tokens_in", "tokens_out", "bytes_in", "bytes_out", "latency_sum_ms", "latency_avg_ms",
          "latency_p95_ms", "first_at", "last_at")


def snapshot(day: date | None = None) -> list[tuple]:
    rows = UsageDaily.objects.all() if day is None else UsageDaily.objects.filter(day=day)
    return sorted(rows.values_list(*FIELDS), key=repr)


def later(day: date) -> datetime:
    """A moment when ``day`` is well over (finalisable)."""
    return at(day + timedelta(days=2))


@pytest.fixture
def server(admin):
    return make_server(admin)


@pytest.fixture
def fixture_day(admin, member, server):
    """The hand-computed fixture of D2 (plus one event on D3)."""
    store(
        # alice, s1, "search": latencies 10, 20, 30, 40, 100 → avg 40, p95 = 40 + (100 - 40) * 0.8 = 88
        ev(at(D2, 1), admin, server, latency=10, tokens_in=5, tokens_out=7, bytes_in=100, bytes_out=1000),
        ev(at(D2, 2), admin, server, latency=20, tokens_in=5, tokens_out=7, bytes_in=100, bytes_out=1000),
        ev(at(D2, 3), admin, server, latency=30, outcome="error", tokens_in=5, tokens_out=0),
        ev(at(D2, 4), admin, server, latency=40, outcome="timeout", tokens_in=5, tokens_out=0),
        ev(at(D2, 5), admin, server, latency=100, outcome="quota", tokens_in=0, tokens_out=0, bytes_in=0, bytes_out=0),
        # alice, s1, tools/list: not a tool call → tool "" whatever tool_name says
        ev(at(D2, 6), admin, server, method="tools/list", tool="ignored", latency=3),
        ev(at(D2, 7), admin, server, method="initialize", tool="", latency=5, outcome="upstream_error"),
        # bob, s1, "search", one blocked call
        ev(at(D2, 8), member, server, latency=12.5, outcome="blocked"),
        # next day
        ev(at(D3, 0), admin, server, latency=1),
    )


def test_aggregates_match_the_hand_computed_fixture(fixture_day, admin, member, server):
    results = aggregation.aggregate_days(D2, D3, now=later(D3))
    assert [(r.day, r.state, r.buckets, r.events) for r in results] == [(D2, "final", 3, 8), (D3, "final", 1, 1)]
    rows = {(r.user_id, r.tool): r for r in UsageDaily.objects.filter(day=D2)}
    assert set(rows) == {(admin.user.pk, "search"), (admin.user.pk, ""), (member.user.pk, "search")}

    search = rows[(admin.user.pk, "search")]
    assert (search.workspace_id, search.server_id) == (admin.workspace.pk, server.pk)
    assert (search.requests, search.counted, search.errors, search.quota_rejections, search.blocked) == (5, 2, 2, 1, 0)
    assert (search.tokens_in, search.tokens_out, search.bytes_in, search.bytes_out) == (20, 14, 220, 2040)
    assert search.latency_sum_ms == 200.0
    assert search.latency_avg_ms == 40.0
    assert search.latency_p95_ms == pytest.approx(88.0)
    assert (search.first_at, search.last_at) == (at(D2, 1), at(D2, 5))

    other = rows[(admin.user.pk, "")]
    assert (other.requests, other.counted, other.errors, other.latency_sum_ms) == (2, 0, 1, 8.0)
    assert other.latency_p95_ms == pytest.approx(3 + (5 - 3) * 0.95)

    bob = rows[(member.user.pk, "search")]
    assert (bob.requests, bob.counted, bob.blocked, bob.errors, bob.latency_p95_ms) == (1, 0, 1, 0, 12.5)

    assert UsageDaily.objects.get(day=D3).requests == 1
    assert UsageDayState.objects.get(day=D2).state == DayState.FINAL


def test_database_p95_equals_the_python_fallback(admin, server):
    rng = random.Random(6)
    latencies = [round(rng.uniform(0.1, 5000), 3) for _ in range(257)]
    store(*(ev(at(D1, 0, 0, i % 60, i), admin, server, latency=v) for i, v in enumerate(latencies)))
    aggregation.aggregate_day(D1, final=True)
    assert UsageDaily.objects.get(day=D1).latency_p95_ms == pytest.approx(percentile_cont(latencies), abs=0.001)
    assert percentile_cont([]) is None
    assert percentile_cont([7.0]) == 7.0


def test_running_twice_gives_identical_rows(fixture_day):
    aggregation.aggregate_days(D2, D3, now=later(D3))
    first = snapshot()
    aggregation.aggregate_days(D2, D3, now=later(D3))
    aggregation.run_scheduled(later(D3))
    assert snapshot() == first
    assert UsageDaily.objects.count() == 4


def test_a_run_interrupted_half_way_keeps_the_old_rows_and_is_redone(fixture_day, admin, server, monkeypatch):
    aggregation.aggregate_days(D2, D2, now=later(D3))
    before = snapshot(D2)
    store(ev(at(D2, 9), admin, server, tool="late", latency=1))

    real_insert = aggregation._insert_buckets

    def insert_then_crash(day, until):
        real_insert(day, until)  # the day's rows were deleted and re-inserted…
        raise RuntimeError("worker killed")  # …and the transaction never commits

    monkeypatch.setattr(aggregation, "_insert_buckets", insert_then_crash)
    with pytest.raises(RuntimeError):
        aggregation.aggregate_day(D2, final=True)
    assert snapshot(D2) == before

    monkeypatch.setattr(aggregation, "_insert_buckets", real_insert)
    aggregation.aggregate_day(D2, final=True)
    assert UsageDaily.objects.filter(day=D2, tool="late").count() == 1
    assert UsageDaily.objects.filter(day=D2).count() == 4


class Crash(Exception):
    pass


def crash_on_d2(day, rows):
    if day == D2:
        raise Crash(f"billing down on {day}")


def test_a_hook_failing_mid_range_leaves_earlier_days_final_and_the_rerun_completes(admin, server, settings):
    for day in (D1, D2, D3):
        store(ev(at(day), admin, server), ev(at(day, 13), admin, server, tool="other"))
    settings.USAGE_BILLING_HOOKS = ["tests.test_usage_aggregation.crash_on_d2"]
    with pytest.raises(Crash):
        aggregation.run_scheduled(later(D3))
    assert UsageDayState.objects.get(day=D1).state == DayState.FINAL
    assert not UsageDayState.objects.filter(day=D2).exists()  # rolled back whole
    assert not UsageDaily.objects.filter(day__gte=D2).exists()

    settings.USAGE_BILLING_HOOKS = ["usage.billing.BillingRecordHook"]
    aggregation.run_scheduled(later(D3))
    assert set(UsageDayState.objects.filter(state=DayState.FINAL).values_list("day", flat=True)) >= {D1, D2, D3}
    assert [UsageDaily.objects.filter(day=d).count() for d in (D1, D2, D3)] == [2, 2, 2]


def test_utc_day_boundaries_with_frozen_time(admin, server):
    store(
        ev(datetime(2026, 11, 20, 23, 59, 59, 999000, tzinfo=UTC), admin, server, latency=1),
        ev(datetime(2026, 11, 21, 0, 0, 0, tzinfo=UTC), admin, server, latency=2),
    )
    with time_machine.travel(datetime(2026, 11, 21, 0, 2, tzinfo=UTC), tick=False):
        results = {r.day: r for r in aggregation.run_scheduled()}
    # Two minutes past midnight: inside the grace period, the 20th is refreshed but not final yet,
    # and its partial buckets only cover events older than the grace period (the API reads the rest raw).
    assert results[D3].state == "partial" and results[D3].events == 0
    assert UsageDayState.objects.get(day=D3).covered_until == datetime(2026, 11, 20, 23, 57, tzinfo=UTC)
    assert results[date(2026, 11, 21)].state == "partial" and results[date(2026, 11, 21)].events == 0

    with time_machine.travel(datetime(2026, 11, 21, 0, 15, tzinfo=UTC), tick=False):
        results = {r.day: r for r in aggregation.run_scheduled()}
    assert results[D3].state == "final"
    assert results[date(2026, 11, 21)].state == "partial"
    assert UsageDaily.objects.get(day=D3).last_at == datetime(2026, 11, 20, 23, 59, 59, 999000, tzinfo=UTC)
    assert UsageDayState.objects.get(day=D3).covered_until == datetime(2026, 11, 21, tzinfo=UTC)
    assert UsageDaily.objects.get(day=date(2026, 11, 21)).first_at == datetime(2026, 11, 21, tzinfo=UTC)
    assert UsageDayState.objects.get(day=date(2026, 11, 21)).covered_until == datetime(2026, 11, 21, 0, 10,
                                                                                     tzinfo=UTC)


def test_days_missed_while_workers_were_down_are_filled(admin, server):
    days = [D1 + timedelta(days=i) for i in range(5)]
    for day in days:
        store(ev(at(day), admin, server))
    aggregation.aggregate_day(days[0], final=True)  # the last run before the outage
    aggregation.aggregate_day(days[2], final=False)  # a partial run interrupted by midnight
    with time_machine.travel(at(days[4], 9), tick=False):
        results = aggregation.run_scheduled()
    assert [(r.day, r.state) for r in results] == [
        (days[1], "final"), (days[2], "final"), (days[3], "final"), (days[4], "partial")]
    # Today's event (noon) is after the partial fill's cover (08:55): the usage API reads it raw.
    assert UsageDaily.objects.filter(day__in=days).count() == 4
    assert UsageDayState.objects.get(day=days[4]).covered_until == at(days[4], 8, 55)


def test_a_day_without_events_is_finalised_empty(admin, server):
    store(ev(at(D1), admin, server), ev(at(D3), admin, server))
    aggregation.run_scheduled(later(D3))
    state = UsageDayState.objects.get(day=D2)
    assert (state.state, state.buckets, state.events) == ("final", 0, 0)


def test_a_purged_day_is_never_recomputed(admin, server):
    store(ev(at(D1), admin, server))
    aggregation.aggregate_day(D1, final=True)
    UsageDayState.objects.filter(day=D1).update(raw_purged_at=at(D3))
    UsageEvent.objects.all().delete()
    result = aggregation.aggregate_day(D1, final=True)
    assert result.skipped == "raw events purged"
    assert UsageDaily.objects.filter(day=D1).count() == 1


def test_events_without_server_or_user_are_kept_as_their_own_bucket(admin, server):
    lost = ev(at(D1), admin, None)
    lost.user_id = None
    store(lost, ev(at(D1, 13), admin, server))
    aggregation.aggregate_day(D1, final=True)
    assert sorted((r.user_id is None, r.server_id is None) for r in UsageDaily.objects.all()) == [
        (False, False), (True, True)]


# -- operator command and beat task ---------------------------------------------------------------------


def run_command(*args: str) -> str:
    import io

    out = io.StringIO()
    call_command("aggregate_usage", *args, stdout=out)
    return out.getvalue()


def test_command_day_and_since(admin, server):
    store(ev(at(D1), admin, server), ev(at(D2), admin, server))
    with time_machine.travel(later(D3), tick=False):
        assert run_command("--day", D1.isoformat()).strip() == f"{D1}: final, 1 buckets from 1 events"
        output = run_command("--since", D1.isoformat())
    assert f"{D2}: final, 1 buckets from 1 events" in output
    assert f"{later(D3).date()}: partial" in output


def test_command_without_arguments_runs_the_scheduled_job(admin, server):
    store(ev(at(D1), admin, server))
    with time_machine.travel(later(D1), tick=False):
        output = run_command()
    assert f"{D1}: final, 1 buckets from 1 events" in output


@pytest.mark.parametrize(("args", "message"), [
    (["--day", "2026-13-01"], "--day: '2026-13-01' is not a date; expected YYYY-MM-DD (UTC)."),
    (["--day", "yesterday"], "--day: 'yesterday' is not a date"),
    (["--since", "2026-1-1"], "--since: '2026-1-1' is not a date"),
    (["--day", "2026-11-20", "--since", "2026-11-01"], "Use either --day or --since, not both."),
    (["--day", "2999-01-01"], "--day: 2999-01-01 is in the future"),
])
def test_command_bad_arguments_are_one_clear_error(db, args, message):
    with pytest.raises(CommandError) as exc:
        run_command(*args)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_command_bad_date_exits_non_zero_with_one_line():
    result = subprocess.run(
        [sys.executable, "manage.py", "aggregate_usage", "--day", "2026-02-30"],
        cwd=Path(django_settings.BASE_DIR), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["CommandError: --day: '2026-02-30' is not a date; expected "
                                                  "YYYY-MM-DD (UTC)."]


def test_beat_schedules_aggregation_and_retention():
    schedule = django_settings.CELERY_BEAT_SCHEDULE
    assert schedule["usage-aggregate"]["task"] == "usage.tasks.aggregate_usage"
    assert schedule["usage-aggregate"]["schedule"] == 900.0
    assert schedule["usage-retention"]["task"] == "usage.tasks.purge_usage"


def test_the_beat_task_aggregates(admin, server):
    store(ev(at(D1), admin, server))
    with time_machine.travel(later(D1), tick=False):
        summary = tasks.aggregate_usage()
    assert f"{D1}: final, 1 buckets from 1 events" in summary
