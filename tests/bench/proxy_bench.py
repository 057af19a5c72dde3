"""`make bench`: the same bounded load directly against an SDK upstream and through the
gateway (real API key, Redis quota, usage events on PostgreSQL), at C = 1, 16 and 64.

Prints p50/p95/p99 latency, req/s, errors, the gateway's CPU per call (from /proc) and the
ratios to direct. Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

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


def body(i: int) -> bytes:
    return json.dumps({
        "jsonrpc": "2.0", "id": i, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hello"},
                   "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                             "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
                             "io.modelcontextprotocol/clientCapabilities": {}}},
    }).encode()


async def drive(session: aiohttp.ClientSession, url: str, headers: dict[str, str], concurrency: int,
                total: int) -> dict:
    """``total`` requests from ``concurrency`` clients: raw latencies, elapsed time, errors."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body(i), headers=headers) as response:
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


async def measure(direct_url: str, proxy_url: str, headers: dict[str, str], key: str, level: int, total: int,
                  rounds: int, pids: list[int]) -> dict:
    """Alternate direct and gateway rounds so that a machine that slows down or speeds up during
    the run (other tenants, CPU frequency) weighs on both sides alike."""
    direct: list[dict] = []
    proxied: list[dict] = []
    cpu = 0.0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=level)) as to_direct, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=level)) as to_gateway:
        await drive(to_direct, direct_url, headers, level, 2 * level)  # open the connections
        with_key = {**headers, "Authorization": f"Bearer {key}"}
        await drive(to_gateway, proxy_url, with_key, level, 2 * level)
        for _ in range(rounds):
            direct.append(await drive(to_direct, direct_url, headers, level, total // rounds))
            before = cpu_seconds(pids)
            proxied.append(await drive(to_gateway, proxy_url, with_key, level, total // rounds))
            cpu += cpu_seconds(pids) - before
    gateway = summarise(proxied)
    gateway["cpu_ms_per_call"] = cpu * 1000 / gateway["n"]
    return {"concurrency": level, "direct": summarise(direct), "gateway": gateway}


def setup_gateway_data(upstream_url: str) -> tuple[str, str]:
    """Create a workspace, a free-plan user with a key, and the approved upstream."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from external_mcp import catalog, health, services
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
    return str(server.pk), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per run (bounded load)")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5, help="alternating direct/gateway rounds per level")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the gateway")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    if "postgres" not in os.environ.get("DATABASE_URL", "") or not os.environ.get("REDIS_URL"):
        raise SystemExit("run through `make bench` (needs the private PostgreSQL and Redis)")
    env = {**os.environ, "DEBUG": "false", "ALLOWED_HOSTS": "127.0.0.1", "SECURE_SSL_REDIRECT": "false",
           "EXTERNAL_MCP_ALLOWED_PROTOCOLS": "https,http", "EXTERNAL_MCP_ALLOWED_NETWORKS": "127.0.0.1/32",
           "EXTERNAL_MCP_FREE_DAILY_LIMIT": "1000000000", "LOG_LEVEL": "WARNING"}
    os.environ.update({k: v for k, v in env.items() if k != "DEBUG"})
    up_port, gw_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.upstream", "--port", str(up_port)],
                                      cwd=ROOT, env=env, start_new_session=True))
        wait_port(up_port)
        upstream_url = f"http://127.0.0.1:{up_port}/mcp"
        server_id, key = setup_gateway_data(upstream_url)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "twinmcp.asgi:application", "--host", "127.0.0.1", "--port",
             str(gw_port), "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=env, start_new_session=True)
        procs.append(gateway)
        wait_port(gw_port)
        proxy_url = f"http://127.0.0.1:{gw_port}/api/v1/external-mcp/{server_id}/mcp"
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        pids = family(gateway.pid)
        asyncio.run(measure(upstream_url, proxy_url, headers, key, 4, 600, 1, pids))  # warm-up
        rows = [asyncio.run(measure(upstream_url, proxy_url, headers, key, int(level), args.requests, args.rounds,
                                    pids)) for level in args.levels.split(",")]
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'C':>3} {'path':<8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6} "
          f"{'CPU ms/call':>11} {'p50 +ms':>8} {'rps ratio':>9}")
    for row in rows:
        d, g = row["direct"], row["gateway"]
        for name, r in (("direct", d), ("gateway", g)):
            extra = ""
            if name == "gateway":
                extra = (f"{r['cpu_ms_per_call']:>11.2f} {r['p50'] - d['p50']:>8.2f} "
                         f"{r['rps'] / d['rps']:>9.2f}")
            print(f"{row['concurrency']:>3} {name:<8} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['rps']:>8.0f} {r['errors']:>6} {extra}")


if __name__ == "__main__":
    main()
