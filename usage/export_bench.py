"""Usage export benchmark: ``python -m usage.export_bench --events 1000000``.

Needs a real PostgreSQL in DATABASE_URL and Debian's clickhouse-server; run it with
``bash .ci/with-services.sh .venv/bin/python -m usage.export_bench``. It

1. generates two finished UTC days of usage events in a throwaway workspace (``usage.bench``'s
   generator): a small day (¼ of ``--events``) and a large one (``--events``), and finalises them;
2. starts a private ClickHouse on loopback (``tests/clickhouse_server.py``);
3. delivers each day, at the events level, to a files destination (Parquet + JSON Lines) and to the
   ClickHouse destination, and the large day at the daily level to both; each delivery runs in a
   child process (``manage.py deliver_usage``'s code path) whose peak RSS comes from ``wait4`` —
   the floor is a child that only loads Django and pyarrow;
4. checks what arrived (ClickHouse's count) and prints time, rows/s and peak RSS — targets: the
   same peak RSS for both days (flat as rows grow, as the CSV export), and at most 100 MB above
   the floor (pyarrow alone makes the floor ~50 MB higher than the CSV export's);
5. deletes everything it created.

Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path

from usage.bench import Fixture, _require_postgresql, _setup_django, run_measured

FLAT_TOLERANCE_MB = 20.0
TARGET_ABOVE_FLOOR_MB = 100.0  # what a delivery may add to a child that only loaded Django and pyarrow


def child(destination: str, day: str) -> None:
    """In the child: one delivery, forced, through ``usage.delivery`` as the scheduler runs it."""
    _setup_django()
    if destination == "floor":
        import pyarrow.parquet  # noqa: F401  (the floor: what every delivery child loads)

        print(json.dumps({"state": "floor", "rows": 0, "seconds": 0.0}))
        return
    from usage import delivery
    from usage.models import ExportDestination

    started = time.perf_counter()
    result = delivery.deliver_day(ExportDestination.objects.get(name=destination), date.fromisoformat(day),
                                  force=True)
    print(json.dumps({"state": str(result.state), "rows": result.rows, "detail": result.detail,
                      "seconds": time.perf_counter() - started}))


def run_child(destination: str, day: date) -> dict:
    return run_measured(["-m", "usage.export_bench", "--child", destination, day.isoformat()])


def main() -> None:
    parser = argparse.ArgumentParser(description="Usage export benchmark (PostgreSQL + ClickHouse).")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--tools", type=int, default=40)
    parser.add_argument("--child", nargs=2, metavar=("DESTINATION", "DAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    _setup_django()
    _require_postgresql()
    from django.core.management import call_command

    from tests.clickhouse_server import ClickHouseServer
    from usage import aggregation, destinations
    from usage.models import ExportDestination

    call_command("migrate", verbosity=0)
    today = datetime.now(UTC).date()
    small_day, large_day = today - timedelta(days=3), today - timedelta(days=2)
    sizes = {small_day: max(args.events // 4, 1), large_day: args.events}
    fixture = Fixture(args.users, args.servers)
    workdir = Path(tempfile.mkdtemp(prefix="twinmcp-export-bench-"))
    clickhouse = ClickHouseServer(workdir / "clickhouse")
    failed = False
    try:
        started = time.perf_counter()
        for day, count in sizes.items():
            fixture.generate(count, 1, args.tools, datetime.combine(day, dt_time(23, 59, 59), tzinfo=UTC))
            aggregation.aggregate_day(day, final=True)
        print(f"generated and finalised {sum(sizes.values()):,} events on {small_day} and {large_day} in "
              f"{time.perf_counter() - started:.1f} s")
        clickhouse.start()
        for name, kind, level, target in (
            ("bench-files", "files", "events", {"directory": str(workdir / "files")}),
            ("bench-clickhouse", "clickhouse", "events", {"url": clickhouse.url}),
            ("bench-files-daily", "files", "daily", {"directory": str(workdir / "files")}),
            ("bench-clickhouse-daily", "clickhouse", "daily", {"url": clickhouse.url}),
        ):
            destinations.destination_create(name=name, kind=kind, level=level, start_day=small_day, enabled=False,
                                            **target)
        floor = run_child("floor", small_day)
        print(f"floor (Django + pyarrow loaded, nothing delivered): peak RSS {floor['peak_rss_mb']:.0f} MB")
        peaks: dict[str, list[float]] = {}
        runs = [(name, day) for name in ("bench-files", "bench-clickhouse") for day in (small_day, large_day)]
        runs += [("bench-files-daily", large_day), ("bench-clickhouse-daily", large_day)]
        for name, day in runs:
            result = run_child(name, day)
            rate = (result["rows"] or 0) / result["seconds"] if result["seconds"] else 0
            print(f"{name:24s} {day}: {result['state']}, {result['rows']:,} rows in {result['seconds']:.1f} s "
                  f"({rate:,.0f} rows/s), peak RSS {result['peak_rss_mb']:.0f} MB {result.get('detail') or ''}")
            if result["state"] != "delivered" or result["peak_rss_mb"] - floor["peak_rss_mb"] > TARGET_ABOVE_FLOOR_MB:
                failed = True
            peaks.setdefault(name, []).append(result["peak_rss_mb"])
        landed = int(clickhouse.query(f"SELECT count() FROM twinmcp.usage_events WHERE day = '{large_day}'"))  # noqa: S608
        print(f"ClickHouse holds {landed:,} events of {large_day} (sent {sizes[large_day]:,})")
        failed |= landed != sizes[large_day]
        for name in ("bench-files", "bench-clickhouse"):
            small, large = peaks[name]
            flat = large - small <= FLAT_TOLERANCE_MB
            print(f"{name}: peak RSS {small:.0f} MB for {sizes[small_day]:,} rows, {large:.0f} MB for "
                  f"{sizes[large_day]:,} rows: {'flat' if flat else 'NOT flat'} (tolerance {FLAT_TOLERANCE_MB:.0f} MB)")
            failed |= not flat
    finally:
        clickhouse.close()
        ExportDestination.objects.filter(name__startswith="bench-").delete()
        fixture.cleanup()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
