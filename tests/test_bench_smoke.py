"""`make bench` keeps working: a tiny run of the proxy benchmark, every path driven through real
processes (SDK upstream, the floor pass-through, the gateway under uvicorn) on this run's private
PostgreSQL and Redis. Figures are not checked (timing is the benchmark's business, not a test's);
what must hold is the work: every call answered, one log line per proxied request, the stages
reported when asked, the machine's load measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bench import machine

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_benchmark_run_drives_every_path_and_counts_every_log_line(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.proxy_bench", "--levels", "2", "--rounds", "2", "--requests", "40",
         "--list-requests", "0", "--stage-timers", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "twinmcp.settings"}, capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["concurrency"] == 2 and set(row["machine"]) == {"seconds", "ours_cores", "other_cores", "steal_cores"}
    for name in ("direct", "floor", "gateway", "workspace", "oauth", "sse"):
        assert (row[name]["n"], row[name]["errors"]) == (40, 0), (name, row[name])
    for name in ("gateway", "workspace", "oauth", "sse"):
        assert row[name]["log_lines"] == 40
        assert {"auth", "quota", "upstream", "relay", "record"} <= set(row[name]["stages_p50"])
    assert "route" in row["workspace"]["stages_p50"]
    assert "Targets" in result.stdout and "proxied-request log lines / requests: gateway 40/40" in result.stdout


def test_the_load_accounting_splits_this_process_from_the_rest():
    load = machine.Load(ours=[os.getpid()])
    sum(i * i for i in range(2_000_000))  # some CPU of our own
    figures = load.result()
    assert figures["seconds"] > 0 and figures["ours_cores"] > 0
    assert figures["other_cores"] >= 0 and figures["steal_cores"] >= 0
    assert machine.pin_sets(1) is None and machine.pin_sets(4) == ({2, 3}, {0, 1})


def test_a_tiny_export_benchmark_delivers_every_day_to_both_destinations():
    """`make bench-exports` keeps working: its own ClickHouse, every delivery in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "usage.export_bench", "--events", "2000", "--users", "5", "--servers", "2"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "twinmcp.settings"}, capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "bench-files              " in result.stdout and "delivered, 2,000 rows" in result.stdout
    assert "ClickHouse holds 2,000 events" in result.stdout and result.stdout.count(": flat") == 2
