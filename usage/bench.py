"""Usage reporting benchmark: ``python -m usage.bench --events 1000000 --days 30``.

Needs a real PostgreSQL in DATABASE_URL (refuses SQLite) — run it on a throwaway database, e.g.
``bash .ci/with-services.sh .venv/bin/python -m usage.bench`` which starts a private one. It

1. creates a throwaway workspace (users, servers, an admin API key) and inserts ``--events`` usage
   events, the same number on each of the last ``--days`` UTC days (today included: its share is
   squeezed into the hours elapsed, the worst case for the API, which reads today from raw
   events), with one ``INSERT … SELECT … FROM generate_series`` (random methods, tools, outcomes,
   latencies; each user works with a couple of servers and a handful of tools, as real users do);
2. times the aggregation of every day (``usage.aggregation.run_scheduled``: all finished days
   finalised, today partial) — target ≤ 60 s;
3. times the usage API in-process (Django test client, API key, the real middleware stack):
   a 30-day per-user query (``group_by=user``) and a 30-day query of one user (``group_by=day``),
   ``--runs`` times each after one warm-up — target p95 ≤ 200 ms;
4. measures the peak RSS of CSV exports run in a child process (``resource`` / ``wait4``):
   raw events (``level=event``) over ~¼ of the days and over all of them (≈ 250,000 and 1,000,000
   rows, to show memory stays flat as rows grow), and the aggregates (``level=bucket``) — target
   ≤ 150 MB. The event level is used for the million-row export because aggregates are ~30x
   smaller than the events they summarise: the streaming path (server-side cursor, chunked
   writer) is the same for both;
5. deletes everything it created (unless ``--keep``).

Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

TARGET_AGGREGATION_S = 60.0
TARGET_API_P95_MS = 200.0
TARGET_EXPORT_RSS_MB = 150.0
ROOT = Path(__file__).resolve().parent.parent


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")
    # The in-process test client talks plain HTTP to host "testserver".
    os.environ.setdefault("ALLOWED_HOSTS", "testserver")
    os.environ["SECURE_SSL_REDIRECT"] = "false"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # The private var/ of .ci/with-services.sh has no collected static files: whitenoise says so per client.
    warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)
    import django

    django.setup()


def _require_postgresql() -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        raise SystemExit(
            f"usage.bench needs PostgreSQL (DATABASE_URL=postgres://…), not {connection.vendor}: run it with "
            "`bash .ci/with-services.sh .venv/bin/python -m usage.bench`."
        )


def p95(values: list[float]) -> float:
    from usage.queries import percentile_cont

    return float(percentile_cont(values) or 0.0)


# -- data -------------------------------------------------------------------------------------------------


GENERATE_SQL = """
INSERT INTO external_mcp_usage_logs (
    created_at, user_id, workspace_id, server_id, api_key_id, method, tool_name, jsonrpc_id, request_id,
    tokens_in, tokens_out, bytes_in, bytes_out, latency_ms, upstream_status, jsonrpc_error_code, outcome, counted,
    endpoint)
SELECT
    %(start)s::timestamptz + (g / %(per_day)s) * interval '1 day'
        + ((g %% %(per_day)s)::bigint * (CASE WHEN g / %(per_day)s = %(last_day)s THEN %(today_us)s::bigint
                                            ELSE 86400000000 END) / %(per_day)s) * interval '1 microsecond',
    u.user_id, %(workspace)s::uuid,
    (%(servers)s::uuid[])[1 + ((u.idx + floor(r2 * 2)::int) %% %(n_servers)s)],
    %(key)s::uuid,
    m.method,
    CASE WHEN m.method = 'tools/call' THEN 'tool-' || ((u.idx * 3 + floor(r3 * 5)::int) %% %(n_tools)s) ELSE '' END,
    g::text, md5(g::text),
    (20 + r4 * 400)::int, (50 + r5 * 2000)::int, (100 + r4 * 1600)::int, (200 + r5 * 8000)::bigint,
    round((exp(r6 * 6) + r7)::numeric, 3)::float8,
    200, CASE WHEN o.outcome = 'error' THEN -32603 END,
    o.outcome,
    m.method = 'tools/call' AND o.outcome = 'ok',
    'server'
FROM (
    SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5, random() AS r6,
           random() AS r7, random() AS r8, random() AS r9
    FROM generate_series(0, %(n)s - 1) AS g
) AS x
CROSS JOIN LATERAL (
    SELECT floor(x.r1 * %(n_users)s)::int AS idx,
           (%(users)s::bigint[])[1 + floor(x.r1 * %(n_users)s)::int] AS user_id
) AS u
CROSS JOIN LATERAL (
    SELECT CASE WHEN x.r8 < 0.85 THEN 'tools/call' WHEN x.r8 < 0.95 THEN 'tools/list' ELSE 'initialize' END
           AS method
) AS m
CROSS JOIN LATERAL (
    SELECT CASE WHEN x.r9 < 0.90 THEN 'ok' WHEN x.r9 < 0.95 THEN 'error' WHEN x.r9 < 0.97 THEN 'timeout'
                WHEN x.r9 < 0.98 THEN 'upstream_error' WHEN x.r9 < 0.99 THEN 'quota' ELSE 'blocked' END AS outcome
) AS o
"""


class Fixture:
    """The throwaway workspace and what the benchmark created in it."""

    def __init__(self, users: int, servers: int) -> None:
        from django.contrib.auth import get_user_model
        from waffle.models import Flag

        from external_mcp.exposed_names import derive_prefix
        from external_mcp.models import ExternalMcpServer
        from twinmcp import services as core
        from twinmcp.flags import flag_enable_for_workspace
        from twinmcp.models import Membership, Profile
        from usage.models import UsageDayState

        stamp = int(time.time())
        self.flag_existed = Flag.objects.filter(name="external_mcp_connect").exists()
        self.days_before = set(UsageDayState.objects.values_list("day", flat=True))
        self.workspace = core.workspace_create(slug=f"usage-bench-{stamp}", name="Usage benchmark")
        flag_enable_for_workspace(workspace=self.workspace)
        User = get_user_model()
        self.users = User.objects.bulk_create([User(username=f"bench-{stamp}-{i:04d}") for i in range(users)])
        plan = core.plan_get(code="free")
        Profile.objects.bulk_create([Profile(user=user, plan=plan) for user in self.users])
        Membership.objects.bulk_create([
            Membership(user=user, workspace=self.workspace, role="admin" if i == 0 else "member")
            for i, user in enumerate(self.users)
        ])
        self.admin = self.users[0]
        self.key, self.raw_key = core.api_key_create(user=self.admin, workspace=self.workspace, name="bench")
        self.servers = ExternalMcpServer.objects.bulk_create([
            ExternalMcpServer(workspace=self.workspace, name=f"bench-server-{i}",
                              prefix=derive_prefix(f"bench-{i}", ()), base_url="https://93.184.215.14/mcp")
            for i in range(servers)
        ])

    def generate(self, events: int, days: int, tools: int, now: datetime) -> None:
        from django.db import connection

        # The same number of events every day, today included (squeezed into the hours elapsed so far):
        # the usage API reads today from raw events, so this is its worst case whatever the time of day.
        start = datetime.combine(now.date() - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC)
        today_us = max(1_000_000, int((now - (start + timedelta(days=days - 1))).total_seconds() * 1_000_000))
        with connection.cursor() as cursor:
            cursor.execute(GENERATE_SQL, {
                "start": start, "per_day": -(-events // days), "last_day": days - 1, "today_us": today_us,
                "workspace": str(self.workspace.pk), "key": str(self.key.pk),
                "users": [user.pk for user in self.users], "n_users": len(self.users),
                "servers": [str(server.pk) for server in self.servers], "n_servers": len(self.servers),
                "n_tools": tools, "n": events,
            })
            cursor.execute("ANALYZE external_mcp_usage_logs")

    def cleanup(self) -> None:
        from django.db import connection
        from waffle.models import Flag

        from usage.models import BillingRecord, UsageDaily, UsageDayState, UsageEvent

        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM external_mcp_usage_logs WHERE workspace_id = %s", [self.workspace.pk])
        assert not UsageEvent.objects.filter(workspace_id=self.workspace.pk).exists()
        UsageDaily.objects.filter(workspace_id=self.workspace.pk).delete()
        BillingRecord.objects.filter(workspace_id=self.workspace.pk).delete()
        UsageDayState.objects.exclude(day__in=self.days_before).delete()
        for server in self.servers:
            server.delete()
        users = [user.pk for user in self.users]
        self.workspace.delete()
        from django.contrib.auth import get_user_model

        get_user_model().objects.filter(pk__in=users).delete()
        if not self.flag_existed:
            Flag.objects.filter(name="external_mcp_connect").delete()


# -- measurements -------------------------------------------------------------------------------------------


def time_api(raw_key: str, params: dict[str, str], runs: int) -> tuple[list[float], dict]:
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    first = client.get("/api/v1/external-mcp/usage", params)  # warm-up
    if first.status_code != 200:
        raise SystemExit(f"usage API answered {first.status_code}: {first.content[:300]!r}")
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get("/api/v1/external-mcp/usage", params)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return timings, first.json()


def export_child(params: dict[str, str]) -> None:
    """In the child process: stream one export through the view, discard it, report the size."""
    _setup_django()
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {os.environ['USAGE_BENCH_KEY']}")
    started = time.perf_counter()
    response = client.get("/api/v1/external-mcp/usage/export", params)
    lines = size = 0
    for chunk in response.streaming_content:
        lines += chunk.count(b"\n")
        size += len(chunk)
    elapsed = time.perf_counter() - started
    print(json.dumps({"status": response.status_code, "rows": lines - 1, "bytes": size, "seconds": elapsed}))


def run_measured(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python <args>`` in a child process that prints a JSON line last; add its own peak RSS
    (from wait4(), so no other process counts)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed ({proc.returncode})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def measure_export(raw_key: str, params: dict[str, str]) -> dict:
    """Run one export in a child process."""
    return run_measured(["-m", "usage.bench", "--export-child", json.dumps(params)],
                        env={**os.environ, "USAGE_BENCH_KEY": raw_key})


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Usage reporting benchmark (needs PostgreSQL).")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50, help="API calls timed per query")
    parser.add_argument("--keep", action="store_true", help="leave the generated data in place")
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child:
        export_child(json.loads(args.export_child))
        return
    if args.events < 1 or args.days < 1 or args.users < 1 or args.servers < 1 or args.tools < 1:
        parser.error("--events, --days, --users, --servers and --tools must be at least 1")

    _setup_django()
    _require_postgresql()
    from django.core.management import call_command
    from django.utils import timezone

    from usage import aggregation
    from usage.models import UsageDaily

    call_command("migrate", verbosity=0)
    now = timezone.now()
    fixture = Fixture(args.users, args.servers)
    failures: list[str] = []
    try:
        started = time.perf_counter()
        fixture.generate(args.events, args.days, args.tools, now)
        print(f"generated {args.events:,} events over {args.days} days ({args.users} users, {args.servers} "
              f"servers, {args.tools} tools) in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        results = aggregation.run_scheduled(now)
        aggregation_s = time.perf_counter() - started
        buckets = UsageDaily.objects.filter(workspace_id=fixture.workspace.pk).count()
        finals = sum(1 for r in results if r.state == "final")
        print(f"aggregation: {aggregation_s:.1f} s for {len(results)} days ({finals} final, "
              f"{len(results) - finals} partial), {buckets:,} buckets (target ≤ {TARGET_AGGREGATION_S:.0f} s)")
        if aggregation_s > TARGET_AGGREGATION_S:
            failures.append("aggregation")

        start = (now.date() - timedelta(days=args.days - 1)).isoformat()
        end = now.date().isoformat()
        queries = {
            "30-day per-user (group_by=user)": {"start": start, "end": end, "group_by": "user"},
            "30-day, one user (group_by=day&user=…)": {"start": start, "end": end, "group_by": "day",
                                                         "user": fixture.users[1].username},
        }
        for label, params in queries.items():
            timings, body = time_api(fixture.raw_key, params, args.runs)
            value = p95(timings)
            print(f"usage API {label}: p50 {sorted(timings)[len(timings) // 2]:.1f} ms, p95 {value:.1f} ms over "
                  f"{args.runs} runs, {body['count']} groups, {body['totals']['requests']:,} requests "
                  f"(target p95 ≤ {TARGET_API_P95_MS:.0f} ms)")
            if value > TARGET_API_P95_MS:
                failures.append(f"api {label}")

        quarter = (now.date() - timedelta(days=-(-args.days // 4) - 1)).isoformat()
        exports = [
            ("events, last ¼ of the days", {"level": "event", "format": "csv", "start": quarter, "end": end}),
            ("events, all days", {"level": "event", "format": "csv", "start": start, "end": end}),
            ("aggregates, all days", {"level": "bucket", "format": "csv", "start": start, "end": end}),
        ]
        for label, params in exports:
            result = measure_export(fixture.raw_key, params)
            print(f"CSV export ({label}): {result['rows']:,} rows, {result['bytes'] / 1e6:.0f} MB in "
                  f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
                  f"(target ≤ {TARGET_EXPORT_RSS_MB:.0f} MB)")
            if result["peak_rss_mb"] > TARGET_EXPORT_RSS_MB:
                failures.append(f"export {label}")
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"largest child peak RSS (RUSAGE_CHILDREN): {children:.0f} MB")
    finally:
        if args.keep:
            print(f"kept workspace {fixture.workspace.slug}")
        else:
            started = time.perf_counter()
            fixture.cleanup()
            print(f"cleaned up in {time.perf_counter() - started:.1f} s")
    if failures:
        print("targets missed: " + ", ".join(failures))
        raise SystemExit(1)
    print("all targets met")


if __name__ == "__main__":
    main()
