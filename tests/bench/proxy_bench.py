"""`make bench`: the same bounded load on five paths in alternating rounds, at C = 1, 16 and 64:

* ``direct``: an SDK upstream (stateless, JSON answers, an ``echo`` tool);
* ``floor``: a bare ASGI + aiohttp pass-through to it on the same server stack (``floor.py``): the
  machine's own floor for any Python proxy, measured in the same run;
* ``gateway``: the per-server endpoint ``/api/v1/external-mcp/<server_id>/mcp``;
* ``workspace``: the workspace endpoint ``/api/v1/external-mcp/mcp`` (the tool as ``<prefix>__echo``);
* ``oauth``: the per-server endpoint of a second server on the same upstream whose calls carry a
  connected account's OAuth access token (from the per-process cache, as in production).

The gateway does all its work per call: API key, exact Redis quota, governance, a usage event
committed to PostgreSQL before the last byte, and, at ``LOG_LEVEL=INFO`` as in production, one JSON
log line (written to a file and counted against the requests sent). Figures are medians over the
rounds with their ranges; CPU is each process's own (from /proc); the machine's other load and the
hypervisor's steal are measured meanwhile, and a level run on a busy machine is labelled so. Then
``tools/list`` on the workspace endpoint of a second workspace holding 1,000 approved tools across
20 servers that no upstream backs (``tools_list_bench``). Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.bench import machine, tools_list_bench

ROOT = Path(__file__).resolve().parents[2]
MODERN = "2026-07-28"
HANDSHAKE = "2025-06-18"


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


def body(i: int, tool: str = "echo", *, modern: bool = True) -> bytes:
    params: dict = {"name": tool, "arguments": {"text": "hello"}}
    if modern:
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                           "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
                           "io.modelcontextprotocol/clientCapabilities": {}}
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}).encode()


async def open_sessions(session: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int) -> list[str]:
    """``n`` handshake-era agent sessions (one per concurrent client of a path that needs them)."""
    opened = []
    for _ in range(n):
        initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
        async with session.post(url, json=initialize, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise SystemExit(f"initialize through {url}: HTTP {response.status}")
            sid = response.headers["Mcp-Session-Id"]
        async with session.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                                headers={**headers, "Mcp-Session-Id": sid}) as response:
            await response.read()
        opened.append(sid)
    return opened


async def close_sessions(session: aiohttp.ClientSession, url: str, headers: dict[str, str], sids: list[str]) -> None:
    for sid in sids:
        async with session.delete(url, headers={**headers, "Mcp-Session-Id": sid}) as response:
            await response.read()


async def drive(session: aiohttp.ClientSession, url: str, headers: dict[str, str], concurrency: int,
                total: int, tool: str = "echo", agent_sessions: list[str] | None = None) -> dict:
    """``total`` requests from ``concurrency`` clients: raw latencies, elapsed time, errors by kind.
    With ``agent_sessions``, client k is a handshake-era agent in session k."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    counter = iter(range(total))

    async def worker(k: int) -> None:
        sent = {**headers, "Mcp-Session-Id": agent_sessions[k]} if agent_sessions else headers
        for i in counter:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body(i, tool, modern=not agent_sessions),
                                        headers=sent) as response:
                    payload = await response.read()
                    if response.status != 200:
                        errors[f"HTTP {response.status}"] += 1
                    elif b'"error"' in payload:
                        errors["JSON-RPC error"] += 1
            except aiohttp.ClientError as exc:
                errors[type(exc).__name__] += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return {"latencies": latencies, "elapsed": time.perf_counter() - started, "errors": sum(errors.values()),
            "error_kinds": dict(errors)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def spread(values: list[float]) -> dict[str, float]:
    """A figure over the rounds: its median and its range."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass(frozen=True)
class Target:
    """One path under load: its URL, the tool it calls, its request headers, and the processes whose
    CPU is charged to it (none for direct: the upstream's own CPU is in every path alike)."""

    url: str
    tool: str
    headers: dict[str, str]
    pids: tuple[int, ...] = ()
    log_key: tuple[str, str] | None = None
    """The ``endpoint`` and ``server`` of its requests' log lines (gateway paths only)."""
    handshake: bool = False
    """Each client is a handshake-era agent with a session (the HTTP+SSE bridge needs one)."""


class GatewayLog:
    """The gateway's log file, read as it grows: each proxied request's JSON line, counted per
    endpoint and server, and its ``stages`` when the timers are on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        lines = []
        for raw in data[:cut].splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == "proxy_request":
                lines.append(entry)
        return lines


async def measure(paths: dict[str, Target], level: int, total: int, rounds: int, log: GatewayLog,
                  others: list[int], groups: dict[str, list[int]] | None = None) -> dict:
    """Every path in every round, in an order that rotates from round to round, so that a machine
    that slows down or speeds up during the run (other tenants, CPU frequency) weighs on all of them
    alike and none always follows another. Per path: the median and range over rounds of its p50,
    req/s and CPU per call, and of its differences to direct and to the floor measured in the same
    round; p95/p99 over all its requests. ``groups``: the other processes whose CPU per call is
    reported per path (upstream, load generator, PostgreSQL and Redis), for the machine's CPU budget."""
    groups = groups or {}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    logged: dict[tuple[str, str], int] = {}
    stages: dict[tuple[str, str], dict[str, list[float]]] = {}

    def read_log() -> None:
        for line in log.new_lines():
            key = (line.get("endpoint", ""), line.get("server", ""))
            logged[key] = logged.get(key, 0) + 1
            for stage, ms in (line.get("stages") or {}).items():
                stages.setdefault(key, {}).setdefault(stage, []).append(ms)

    per_round = max(1, total // rounds)
    async with contextlib.AsyncExitStack() as stack:
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends them: a path waits for the
        # others' turns, and reusing a connection the server is closing would count as its error.
        sessions = {name: await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=level, keepalive_timeout=3))) for name in paths}
        agents = {name: await open_sessions(sessions[name], path.url, path.headers, level)
                  for name, path in paths.items() if path.handshake}
        for name, path in paths.items():  # open the connections, fill the caches
            await drive(sessions[name], path.url, path.headers, level, 2 * level, path.tool, agents.get(name))
        log.new_lines()
        load = machine.Load(ours=others)
        order = list(paths)
        for round_no in range(rounds):
            shift = round_no % len(order)
            for name in order[shift:] + order[:shift]:
                path = paths[name]
                before = machine.cpu_seconds(list(path.pids))
                before_groups = {group: machine.cpu_seconds(pids) for group, pids in groups.items()}
                run = await drive(sessions[name], path.url, path.headers, level, per_round, path.tool,
                                  agents.get(name))
                run["cpu"] = machine.cpu_seconds(list(path.pids)) - before
                run["by_process"] = {group: machine.cpu_seconds(pids) - before_groups[group]
                                     for group, pids in groups.items()}
                runs[name].append(run)
                read_log()
        machine_load = load.result()
        await asyncio.sleep(0.5)  # a request's line is written just after its last byte
        read_log()
        for name, sids in agents.items():
            await close_sessions(sessions[name], paths[name].url, paths[name].headers, sids)
    row: dict = {"concurrency": level, "machine": machine_load, "busy": machine.is_busy(machine_load)}
    for name, path in paths.items():
        latencies = [x for run in runs[name] for x in run["latencies"]]
        round_p50 = [statistics.median(run["latencies"]) for run in runs[name]]
        round_rps = [len(run["latencies"]) / run["elapsed"] for run in runs[name]]
        figures: dict = {
            "n": len(latencies), "errors": sum(run["errors"] for run in runs[name]),
            "error_kinds": dict(sum((collections.Counter(run["error_kinds"]) for run in runs[name]),
                                    collections.Counter())),
            "p50": spread(round_p50), "p95": percentile(latencies, 0.95), "p99": percentile(latencies, 0.99),
            "rps": spread(round_rps),
        }
        if path.pids:
            figures["cpu_ms_per_call"] = spread([run["cpu"] * 1000 / len(run["latencies"]) for run in runs[name]])
        figures["cpu_by_process"] = {group: statistics.median(run["by_process"][group] * 1000 / len(run["latencies"])
                                                              for run in runs[name]) for group in groups}
        for base in ("direct", "floor"):
            if base in runs and base != name:
                figures[f"added_p50_vs_{base}"] = spread([p - statistics.median(b["latencies"])
                                                          for p, b in zip(round_p50, runs[base], strict=True)])
                figures[f"rps_vs_{base}"] = spread([r * b["elapsed"] / len(b["latencies"])
                                                    for r, b in zip(round_rps, runs[base], strict=True)])
        if path.log_key:
            figures["log_lines"] = logged.get(path.log_key, 0)
            figures["stages_p50"] = {stage: statistics.median(values)
                                     for stage, values in stages.get(path.log_key, {}).items()}
        row[name] = figures
    return row


def setup_gateway_data(upstream_url: str, sse_url: str) -> tuple[str, str, str, str, str]:
    """Create a workspace, a free-plan user with a key, and the approved upstream twice (without
    auth, and as an ``oauth2`` server with a connected account), and the HTTP+SSE upstream. Returns
    the servers' ids, the raw key and the echo tool's name on the workspace endpoint."""
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
    legacy = services.server_create(workspace=workspace, actor=user, name="bench-sse", base_url=sse_url)
    result, legacy = health.check_now(legacy)
    if not result.ok or legacy.transport_found != "sse":
        raise SystemExit(f"upstream check (HTTP+SSE) failed: {result.error_message}")
    catalog.tools_approve(server=legacy, actor=user, select_all=True)
    return str(server.pk), str(oauth.pk), str(legacy.pk), raw, exposed


TARGETS = "gateway CPU <= 1.0 ms at C = 16; added p50 <= 1.5 ms at C = 1; >= 70% of direct req/s at C = 16; " \
          "0 errors at C = 64; workspace and oauth within 10% of those"
GATEWAY_PATHS = ("gateway", "workspace", "oauth", "sse")
TARGET_PATHS = ("gateway", "workspace", "oauth")
"""The paths issue [5/7]'s targets apply to; ``sse`` (the HTTP+SSE bridge) is measured beside them."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per path and level (bounded load)")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per level (medians over them)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the gateway")
    parser.add_argument("--log-level", default="INFO", help="the gateway's LOG_LEVEL (INFO: one JSON line a call)")
    parser.add_argument("--stage-timers", action="store_true", help="EXTERNAL_MCP_STAGE_TIMERS on; p50 per stage")
    parser.add_argument("--profile", help="py-spy the gateway during each level; raw stacks in this directory")
    parser.add_argument("--paths", default="direct,floor,gateway,workspace,oauth,sse",
                        help="which paths to drive (direct and floor are the baselines of the ratios)")
    parser.add_argument("--pin", action="store_true",
                        help="gateway on the upper half of the cores, load generator and upstreams on the lower")
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
           "EXTERNAL_MCP_FREE_DAILY_LIMIT": "1000000000", "LOG_LEVEL": args.log_level, "LOG_FORMAT": "json",
           "EXTERNAL_MCP_STAGE_TIMERS": "true" if args.stage_timers else "false"}
    os.environ.update({k: v for k, v in env.items() if k not in ("DEBUG", "LOG_LEVEL")})
    pins = machine.pin_sets(os.cpu_count() or 1) if args.pin else None
    if pins is not None:
        os.sched_setaffinity(0, pins[1])  # this process and the upstreams it starts
    work = Path(tempfile.mkdtemp(prefix="twinmcp-bench-"))
    up_port, sse_port, floor_port, gw_port = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    recorder = tools_list_bench.Recorder()
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.upstream", "--port", str(up_port)],
                                      cwd=ROOT, env=env, start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.bench.upstream", "--port", str(sse_port),
                                       "--sse"], cwd=ROOT, env=env, start_new_session=True))
        wait_port(up_port)
        wait_port(sse_port)
        upstream_url = f"http://127.0.0.1:{up_port}/mcp"
        floor = subprocess.Popen([sys.executable, "-m", "tests.bench.floor", "--port", str(floor_port),
                                  "--upstream", upstream_url], cwd=ROOT, env=env, start_new_session=True)
        procs.append(floor)
        wait_port(floor_port)
        server_id, oauth_id, sse_id, key, exposed = setup_gateway_data(upstream_url,
                                                                       f"http://127.0.0.1:{sse_port}/sse")
        list_key, list_tools, list_workspace = "", 0, None
        if args.list_requests > 0:
            list_key, list_tools, list_workspace = tools_list_bench.setup_listing_data(
                f"http://127.0.0.1:{recorder.port}/mcp", args.list_servers, args.list_tools)
        with (work / "gateway.log").open("wb") as log_file:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "twinmcp.asgi:application", "--host", "127.0.0.1", "--port",
                 str(gw_port), "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
                cwd=ROOT, env=env, start_new_session=True, stdout=log_file, stderr=log_file,
                preexec_fn=(lambda: os.sched_setaffinity(0, pins[0])) if pins else None)  # noqa: PLW1509
        procs.append(gateway)
        wait_port(gw_port)
        gateway_url = f"http://127.0.0.1:{gw_port}/api/v1/external-mcp"
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        with_key = {**headers, "Authorization": f"Bearer {key}"}
        paths = {
            "direct": Target(upstream_url, "echo", headers),
            "floor": Target(f"http://127.0.0.1:{floor_port}/mcp", "echo", headers, (floor.pid,)),
            "gateway": Target(f"{gateway_url}/{server_id}/mcp", "echo", with_key, (), ("server", server_id)),
            "workspace": Target(f"{gateway_url}/mcp", exposed, {**with_key, "Mcp-Name": exposed}, (),
                                ("workspace", server_id)),
            "oauth": Target(f"{gateway_url}/{oauth_id}/mcp", "echo", with_key, (), ("server", oauth_id)),
            "sse": Target(f"{gateway_url}/{sse_id}/mcp", "echo",
                          {"Content-Type": "application/json", "Accept": headers["Accept"],
                           "Authorization": f"Bearer {key}", "MCP-Protocol-Version": HANDSHAKE}, (),
                          ("server", sse_id), handshake=True),
        }
        paths = {name: target for name, target in paths.items() if name in args.paths.split(",")}
        ours = [os.getpid(), *machine.service_pids(), *(proc.pid for proc in procs)]
        log = GatewayLog(work / "gateway.log")
        asyncio.run(measure(paths, 4, 600, 1, log, ours))  # warm-up
        # Every worker has served by now: charge all of them (uvicorn binds before it spawns them).
        gw_pids = tuple(machine.family(gateway.pid))
        paths = {name: dataclasses.replace(target, pids=gw_pids) if target.log_key else target
                 for name, target in paths.items()}
        # Both upstreams: one path runs at a time, so the sum is the CPU of the one being driven.
        groups = {"upstream": [*machine.family(procs[0].pid), *machine.family(procs[1].pid)],
                  "load generator": [os.getpid()],
                  "PostgreSQL + Redis": [pid for root in machine.service_pids() for pid in machine.family(root)]}
        rows = []
        for level in (int(x) for x in args.levels.split(",")):
            spy = start_profile(args.profile, gateway.pid, level)
            rows.append(asyncio.run(measure(paths, level, args.requests, args.rounds, log, ours, groups)))
            stop_profile(spy)
        print_table(rows, exposed, args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if args.list_requests > 0:
            from twinmcp import invalidation

            contacted_before = recorder.connections
            listing = asyncio.run(tools_list_bench.measure_listing(
                f"{gateway_url}/mcp", list_key, list_tools, args.list_requests, args.rounds, args.list_cold,
                lambda: machine.cpu_seconds(list(gw_pids)), invalidation.announce_change, list_workspace))
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
        shutil.rmtree(work, ignore_errors=True)


def start_profile(directory: str | None, pid: int, level: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the gateway (and its workers) for the whole level: raw stacks for
    flamegraph.pl or speedscope. Sampling costs the gateway CPU: profile in a run of its own."""
    if not directory:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(directory) / f"gateway-c{level}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "500", "--format", "raw",
                             "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL)


def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def fmt(figure: dict[str, float] | None, digits: int = 2) -> str:
    if figure is None:
        return ""
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"


def print_table(rows: list[dict], exposed: str, args: argparse.Namespace) -> None:
    """Per level and path: medians over the rounds with their ranges; ``floor`` is the bare pass-through."""
    print(f"\n{args.rounds} alternating rounds per level, {args.requests} requests per path and level, "
          f"{args.workers} gateway worker(s), LOG_LEVEL={args.log_level}{', pinned' if args.pin else ''}. "
          "Figures: median over the rounds (range).")
    head = (f"{'C':>3} {'path':<9} {'p50 ms':>19} {'p95':>7} {'p99':>7} {'req/s':>16} {'err':>4} "
            f"{'CPU ms/call':>17} {'+p50 vs direct':>19} {'+p50 vs floor':>19} {'rps/direct':>16} {'rps/floor':>16}")
    print(head)
    for row in rows:
        for name in ("direct", "floor", *GATEWAY_PATHS):
            r = row.get(name)
            if r is None:
                continue
            print(f"{row['concurrency']:>3} {name:<9} {fmt(r['p50']):>19} {r['p95']:>7.2f} {r['p99']:>7.2f} "
                  f"{fmt(r['rps'], 0):>16} {r['errors']:>4} {fmt(r.get('cpu_ms_per_call')):>17} "
                  f"{fmt(r.get('added_p50_vs_direct')):>19} {fmt(r.get('added_p50_vs_floor')):>19} "
                  f"{fmt(r.get('rps_vs_direct')):>16} {fmt(r.get('rps_vs_floor')):>16}")
            if r["error_kinds"]:
                print(f"    errors of {name}: {r['error_kinds']}")
        for name in ("direct", "floor", *GATEWAY_PATHS):
            r = row.get(name)
            if r is not None and r["cpu_by_process"]:
                own = f", itself {r['cpu_ms_per_call']['median']:.2f}" if "cpu_ms_per_call" in r else ""
                print(f"    CPU per call of the other processes, {name}: " + ", ".join(
                    f"{group} {ms:.2f}" for group, ms in r["cpu_by_process"].items()) + f" ms{own}")
        load = row["machine"]
        state = "BUSY MACHINE: these figures are not comparable" if row["busy"] else "quiet machine"
        print(f"    C = {row['concurrency']}: this run used {load['ours_cores']:.2f} cores; other processes "
              f"{load['other_cores']:.2f}, hypervisor steal {load['steal_cores']:.2f} over {load['seconds']:.0f} s "
              f"-> {state}")
    print(f"gateway = per-server endpoint (tool echo); workspace = /api/v1/external-mcp/mcp (tool {exposed}); "
          "oauth = per-server endpoint of an oauth2 server, token from the cache; sse = per-server endpoint of an "
          "HTTP+SSE server through the bridge, one agent session per client; floor = bare ASGI + aiohttp "
          "pass-through (tests/bench/floor.py).")
    driven = [name for name in GATEWAY_PATHS if name in rows[0]]
    sent = {name: sum(row[name]["n"] for row in rows) for name in driven}
    lines = {name: sum(row[name]["log_lines"] for row in rows) for name in driven}
    print("proxied-request log lines / requests: " + ", ".join(f"{n} {lines[n]}/{sent[n]}" for n in driven))
    if args.stage_timers:
        print_stages(rows)
    print_targets(rows)


def print_stages(rows: list[dict]) -> None:
    stage_names = ("auth", "request", "route", "quota", "upstream", "relay", "record")
    print("\nStage timers, p50 ms (time since the previous stage; EXTERNAL_MCP_STAGE_TIMERS):")
    print(f"{'C':>3} {'path':<9} " + " ".join(f"{s:>8}" for s in stage_names))
    for row in rows:
        for name in (name for name in GATEWAY_PATHS if name in row):
            stages = row[name]["stages_p50"]
            print(f"{row['concurrency']:>3} {name:<9} "
                  + " ".join(f"{stages[s]:>8.3f}" if s in stages else f"{'':>8}" for s in stage_names))


def print_targets(rows: list[dict]) -> None:
    """Each target against the median of the rounds; workspace and oauth within 10%."""
    by_level = {row["concurrency"]: row for row in rows}
    checks: list[tuple[str, str, float, float, bool]] = []
    for name in (name for name in TARGET_PATHS if name in rows[0]):
        slack = 1.0 if name == "gateway" else 1.1
        if "direct" not in rows[0]:
            continue
        if 16 in by_level:
            cpu = by_level[16][name]["cpu_ms_per_call"]["median"]
            checks.append((name, "CPU ms/call at C = 16", cpu, 1.0 * slack, cpu <= 1.0 * slack))
            ratio = by_level[16][name]["rps_vs_direct"]["median"]
            checks.append((name, "req/s vs direct at C = 16", ratio, 0.70 / slack, ratio >= 0.70 / slack))
        if 1 in by_level:
            added = by_level[1][name]["added_p50_vs_direct"]["median"]
            checks.append((name, "added p50 ms at C = 1", added, 1.5 * slack, added <= 1.5 * slack))
        if 64 in by_level:
            errors = by_level[64][name]["errors"]
            checks.append((name, "errors at C = 64", errors, 0, errors == 0))
    print(f"\nTargets ({TARGETS}):")
    for name, what, value, limit, ok in checks:
        print(f"  {name:<9} {what:<26} {value:>8.2f}  limit {limit:>5.2f}  {'met' if ok else 'NOT MET'}")
    if any(row["busy"] for row in rows):
        print("  (a level ran on a busy machine: re-run on a quiet one before comparing)")


if __name__ == "__main__":
    main()
