"""`make bench`: the same bounded load directly against an SDK upstream and through the
gateway (real API key, Redis quota, usage events on PostgreSQL), at C = 1, 16 and 64, on two
gateway paths: the per-server endpoint ``/api/v1/external-mcp/<server_id>/mcp`` (tool ``echo``)
the workspace endpoint ``/api/v1/external-mcp/mcp`` (the same tool as ``<prefix>__echo``), and the
per-server endpoint of a second server on the same upstream whose calls carry an OAuth access token
of a connected account (``oauth``: the token comes from the per-process cache, as in production).
Then ``tools/list`` on the workspace endpoint of a second workspace holding 1,000 approved tools
across 20 servers that no upstream backs (``tests.bench.tools_list_bench``).

Prints p50/p95/p99 latency, req/s, errors, the gateway's CPU per call (from /proc), the ratios
to direct and the workspace endpoint's CPU per call as a ratio to the per-server endpoint's.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.bench import tools_list_bench

ROOT = Path(__file__).resolve().parents[2]
MODERN = "2026-07-28"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def family(pid: int) -> list[int]:
    """The process and its children (uvicorn workers)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += family(int(child))
    return out


def body(i: int, tool: str = "echo") -> bytes:
    return json.dumps({
        "jsonrpc": "2.0", "id": i, "method": "tools/call",
        "params": {"name": tool, "arguments": {"text": "hello"},
                   "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                             "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
                             "io.modelcontextprotocol/clientCapabilities": {}}},
    }).encode()


async def drive(session: aiohttp.ClientSession, url: str, headers: dict[str, str], concurrency: int,
                total: int, tool: str = "echo") -> dict:
    """``total`` requests from ``concurrency`` clients: raw latencies, elapsed time, errors."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body(i, tool), headers=headers) as response:
                    payload = await response.read()
                    if response.status != 200 or b'"error"' in payload:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "elapsed": time.perf_counter() - started, "errors": errors}


def summarise(runs: list[dict]) -> dict:
    latencies = sorted(x for run in runs for x in run["latencies"])

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"n": len(latencies), "p50": statistics.median(latencies), "p95": pct(0.95), "p99": pct(0.99),
            "rps": len(latencies) / sum(run["elapsed"] for run in runs),
            "errors": sum(run["errors"] for run in runs)}


@dataclass(frozen=True)
class Target:
    """One gateway path under load: its URL, the tool name it is called with, its request headers."""

    url: str
    tool: str
    headers: dict[str, str]


async def measure(direct_url: str, paths: dict[str, Target], headers: dict[str, str], level: int, total: int,
                  rounds: int, pids: list[int]) -> dict:
    """Alternate direct and gateway rounds so that a machine that slows down or speeds up during
    the run (other tenants, CPU frequency) weighs on both sides alike; the gateway paths take
    turns in leading each round, so neither always follows the direct round."""
    direct: list[dict] = []
    proxied: dict[str, list[dict]] = {name: [] for name in paths}
    cpu = dict.fromkeys(paths, 0.0)
    async with contextlib.AsyncExitStack() as stack:
        to_direct = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=level)))
        to_gateway = {name: await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=level))) for name in paths}
        await drive(to_direct, direct_url, headers, level, 2 * level)  # open the connections
        for name, path in paths.items():
            await drive(to_gateway[name], path.url, path.headers, level, 2 * level, path.tool)
        order = list(paths)
        for round_no in range(rounds):
            direct.append(await drive(to_direct, direct_url, headers, level, total // rounds))
            for name in order[round_no % len(order):] + order[:round_no % len(order)]:
                path = paths[name]
                before = cpu_seconds(pids)
                proxied[name].append(await drive(to_gateway[name], path.url, path.headers, level, total // rounds,
                                                 path.tool))
                cpu[name] += cpu_seconds(pids) - before
    row: dict = {"concurrency": level, "direct": summarise(direct)}
    for name, runs in proxied.items():
        row[name] = summarise(runs)
        row[name]["cpu_ms_per_call"] = cpu[name] * 1000 / row[name]["n"]
    return row


def setup_gateway_data(upstream_url: str) -> tuple[str, str, str, str]:
    """Create a workspace, a free-plan user with a key, and the approved upstream twice (without
    auth, and as an ``oauth2`` server with a connected account). Returns the servers' ids, the raw
    key and the echo tool's name on the workspace endpoint."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from external_mcp import catalog, connections, health, services
    from twinmcp import services as core
    from twinmcp.flags import flag_enable_for_workspace

    call_command("migrate", verbosity=0)
    workspace = core.workspace_create(slug=f"bench-{int(time.time())}", name="Benchmark")
    user = get_user_model().objects.create_user(username=workspace.slug, password=None)
    core.member_add(workspace=workspace, user=user, role="admin")
    flag_enable_for_workspace(workspace=workspace)
    _, raw = core.api_key_create(user=user, workspace=workspace, name="bench")
    server = services.server_create(workspace=workspace, actor=user, name="bench", base_url=upstream_url)
    result, server = health.check_now(server)
    if not result.ok:
        raise SystemExit(f"upstream check failed: {result.error_message}")
    catalog.tools_approve(server=server, actor=user, select_all=True)
    exposed = catalog.exposed_names_of(server).get("echo")
    if exposed is None:
        raise SystemExit("the upstream lists no echo tool")
    oauth = services.server_create(workspace=workspace, actor=user, name="bench-oauth", base_url=upstream_url,
                                   auth_type="oauth2")
    connections.connection_save_tokens(server=oauth, user=user, own=False, access_token="bench-access-token",
                                       refresh_token=None, expires_at=None, scope="mcp")
    result, oauth = health.check_now(oauth)
    if not result.ok:
        raise SystemExit(f"upstream check (oauth) failed: {result.error_message}")
    catalog.tools_approve(server=oauth, actor=user, select_all=True)
    return str(server.pk), str(oauth.pk), raw, exposed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per run (bounded load)")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5, help="alternating direct/gateway rounds per level")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the gateway")
    parser.add_argument("--list-servers", type=int, default=20, help="servers of the tools/list workspace")
    parser.add_argument("--list-tools", type=int, default=50, help="approved tools per server there")
    parser.add_argument("--list-requests", type=int, default=300,
                        help="tools/list first pages, and as many full walks (0: skip the tools/list part)")
    parser.add_argument("--list-cold", type=int, default=5, help="walks right after a cache flush")
    parser.add_argument("--json", help="write the figures to this file too (tools/list: <name>.tools_list.json)")
    args = parser.parse_args()
    if "postgres" not in os.environ.get("DATABASE_URL", "") or not os.environ.get("REDIS_URL"):
        raise SystemExit("run through `make bench` (needs the private PostgreSQL and Redis)")
    env = {**os.environ, "DEBUG": "false", "ALLOWED_HOSTS": "127.0.0.1", "SECURE_SSL_REDIRECT": "false",
           "EXTERNAL_MCP_ALLOWED_PROTOCOLS": "https,http", "EXTERNAL_MCP_ALLOWED_NETWORKS": "127.0.0.1/32",
           "EXTERNAL_MCP_FREE_DAILY_LIMIT": "1000000000", "LOG_LEVEL": "WARNING"}
    os.environ.update({k: v for k, v in env.items() if k != "DEBUG"})
    up_port, gw_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    recorder = tools_list_bench.Recorder()
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.upstream", "--port", str(up_port)],
                                      cwd=ROOT, env=env, start_new_session=True))
        wait_port(up_port)
        upstream_url = f"http://127.0.0.1:{up_port}/mcp"
        server_id, oauth_id, key, exposed = setup_gateway_data(upstream_url)
        list_key, list_tools, list_workspace = "", 0, None
        if args.list_requests > 0:
            list_key, list_tools, list_workspace = tools_list_bench.setup_listing_data(
                f"http://127.0.0.1:{recorder.port}/mcp", args.list_servers, args.list_tools)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "twinmcp.asgi:application", "--host", "127.0.0.1", "--port",
             str(gw_port), "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=env, start_new_session=True)
        procs.append(gateway)
        wait_port(gw_port)
        gateway_url = f"http://127.0.0.1:{gw_port}/api/v1/external-mcp"
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        with_key = {**headers, "Authorization": f"Bearer {key}"}
        paths = {"gateway": Target(f"{gateway_url}/{server_id}/mcp", "echo", with_key),
                 "workspace": Target(f"{gateway_url}/mcp", exposed, {**with_key, "Mcp-Name": exposed}),
                 "oauth": Target(f"{gateway_url}/{oauth_id}/mcp", "echo", with_key)}
        pids = family(gateway.pid)
        asyncio.run(measure(upstream_url, paths, headers, 4, 600, 1, pids))  # warm-up
        rows = [asyncio.run(measure(upstream_url, paths, headers, int(level), args.requests, args.rounds, pids))
                for level in args.levels.split(",")]
        print_table(rows, exposed)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if args.list_requests > 0:
            from twinmcp import invalidation

            contacted_before = recorder.connections
            listing = asyncio.run(tools_list_bench.measure_listing(
                f"{gateway_url}/mcp", list_key, list_tools, args.list_requests, args.rounds, args.list_cold,
                lambda: cpu_seconds(pids), invalidation.announce_change, list_workspace))
            tools_list_bench.print_listing(listing, args.list_servers, recorder.port,
                                           recorder.connections - contacted_before, recorder.connections)
            listing["upstream_connections"] = recorder.connections
            if args.json:
                Path(args.json).with_suffix(".tools_list.json").write_text(json.dumps(listing, indent=2))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)
        recorder.close()


def print_table(rows: list[dict], exposed: str = "") -> None:
    """The per-level table: ``gateway`` is the per-server endpoint, ``workspace`` the workspace
    endpoint (its last column is its CPU per call as a ratio to the per-server endpoint's)."""
    print(f"\n{'C':>3} {'path':<9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6} "
          f"{'CPU ms/call':>11} {'p50 +ms':>8} {'rps ratio':>9} {'CPU vs gw':>9}")
    for row in rows:
        d, g = row["direct"], row["gateway"]
        for name in ("direct", "gateway", "workspace", "oauth"):
            r = row.get(name)
            if r is None:
                continue
            extra = ""
            if name != "direct":
                extra = (f"{r['cpu_ms_per_call']:>11.2f} {r['p50'] - d['p50']:>8.2f} "
                         f"{r['rps'] / d['rps']:>9.2f}")
            if name in ("workspace", "oauth"):
                extra += f" {r['cpu_ms_per_call'] / g['cpu_ms_per_call']:>9.2f}"
            print(f"{row['concurrency']:>3} {name:<9} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['rps']:>8.0f} {r['errors']:>6} {extra}")
    if any("workspace" in row for row in rows):
        ratios = ", ".join(f"C = {row['concurrency']}: {row['workspace']['cpu_ms_per_call']:.2f} / "
                           f"{row['gateway']['cpu_ms_per_call']:.2f} ms = "
                           f"{row['workspace']['cpu_ms_per_call'] / row['gateway']['cpu_ms_per_call']:.2f}"
                           for row in rows)
        print(f"gateway = per-server endpoint (tool echo); workspace = /api/v1/external-mcp/mcp (tool {exposed}).\n"
              f"workspace CPU per call vs per-server (target <= 1.10): {ratios}")
    if any("oauth" in row for row in rows):
        ratios = ", ".join(f"C = {row['concurrency']}: "
                           f"{row['oauth']['cpu_ms_per_call'] / row['gateway']['cpu_ms_per_call']:.2f}" for row in rows)
        print(f"oauth = per-server endpoint of an oauth2 server (connected account); CPU per call vs per-server "
              f"without auth: {ratios}")


if __name__ == "__main__":
    main()
