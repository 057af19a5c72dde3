"""`make bench-health`: 1,000 registered servers (SDK upstreams on loopback, several ports and
paths) checked by one sweep; prints how long the sweep took against the 60 s interval."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from tests.bench.proxy_bench import ROOT, free_port, wait_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--upstreams", type=int, default=4, help="upstream processes (ports)")
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    if "postgres" not in os.environ.get("DATABASE_URL", ""):
        raise SystemExit("run through `make bench-health` (needs the private PostgreSQL)")
    os.environ.update({"DJANGO_SETTINGS_MODULE": "twinmcp.settings", "EXTERNAL_MCP_ALLOWED_PROTOCOLS": "https,http",
                       "EXTERNAL_MCP_ALLOWED_NETWORKS": "127.0.0.1/32", "EXTERNAL_MCP_MAX_PER_ORG": "100000",
                       "EXTERNAL_MCP_HEALTH_CONCURRENCY": str(args.concurrency), "LOG_LEVEL": "WARNING"})
    ports = [free_port() for _ in range(args.upstreams)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.bench.upstream", "--port", str(p)], cwd=ROOT,
                              start_new_session=True) for p in ports]
    try:
        for port in ports:
            wait_port(port)
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.utils import timezone

        from external_mcp import health
        from external_mcp.exposed_names import derive_prefix
        from external_mcp.models import ExternalMcpServer, HealthCheck
        from twinmcp import services as core

        call_command("migrate", verbosity=0)
        workspace = core.workspace_create(slug=f"health-bench-{int(time.time())}", name="Health benchmark")
        user = get_user_model().objects.create_user(username=workspace.slug)
        now = timezone.now()
        ExternalMcpServer.objects.bulk_create([
            ExternalMcpServer(workspace=workspace, created_by=user, name=f"server-{i:04d}",
                              prefix=derive_prefix(f"server-{i:04d}", ()),
                              base_url=f"http://127.0.0.1:{ports[i % len(ports)]}/mcp?tenant={i}",
                              next_check_at=now)
            for i in range(args.servers)
        ])
        started = time.perf_counter()
        checked = health.sweep(limit=args.servers + 10)
        elapsed = time.perf_counter() - started
        servers = ExternalMcpServer.objects.filter(workspace=workspace)
        healthy = servers.filter(status="healthy").count()
        checks = HealthCheck.objects.filter(server__workspace=workspace)
        failed = checks.filter(ok=False).count()
        print(f"\nchecked {checked} servers in {elapsed:.1f} s (interval 60 s; {checked / elapsed:.0f} checks/s) "
              f"with concurrency {args.concurrency} over {args.upstreams} upstream processes: "
              f"{healthy} healthy, {failed} failed checks")
        servers.delete()
        workspace.delete()
        if elapsed > 60 or healthy != args.servers:
            raise SystemExit(1)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)


if __name__ == "__main__":
    main()
