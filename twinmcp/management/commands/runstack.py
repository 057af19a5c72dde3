"""Run the embedded stack in the foreground (``make run``); Ctrl-C stops every process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

DEMO_UPSTREAM_PORT = "8765"


class Command(BaseCommand):
    help = "Run uvicorn, a Celery worker with beat, and the demo MCP upstream until interrupted."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")

    def handle(self, *args: Any, host: str, port: str, **options: Any) -> None:
        python = sys.executable
        commands = {
            "web": [python, "-m", "uvicorn", "twinmcp.asgi:application", "--host", host, "--port", port,
                    "--lifespan", "off"],
            "celery": [python, "-m", "celery", "-A", "twinmcp", "worker", "-B", "--loglevel=INFO",
                       "--concurrency=2"],
        }
        commands["demo-upstream"] = [python, "-m", "external_mcp.demo_upstream", "--port", DEMO_UPSTREAM_PORT]
        procs: dict[str, subprocess.Popen[bytes]] = {}
        # One metrics directory for every process, so /metrics shows the web and Celery metrics.
        metrics_dir = settings.VAR_DIR / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
        try:
            self.prepare_demo()
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with {proc.returncode}; stopping everything.")
                        stopping = True
                time.sleep(0.5)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            for proc in procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        self.stdout.write("Stopped.")

    def prepare_demo(self) -> None:
        """First start only: check the demo server and approve its tools, so the demo proxy works
        at once. Real servers' tools always wait for an admin's approval."""
        from external_mcp import catalog, health
        from external_mcp.choices import ToolState
        from external_mcp.models import ExternalMcpServer
        from twinmcp.management.commands.seed_demo import DEMO_SERVER, DEMO_SLUG

        server = ExternalMcpServer.objects.filter(workspace__slug=DEMO_SLUG, name=DEMO_SERVER).first()
        if server is None or server.tools.filter(state=ToolState.APPROVED).exists():
            return
        for _ in range(40):
            try:
                with socket.create_connection(("127.0.0.1", int(DEMO_UPSTREAM_PORT)), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.25)
        result, server = health.check_now(server)
        if result.ok:
            approved = catalog.tools_approve(server=server, actor=server.created_by, select_all=True)
            self.stdout.write(f"Demo server is {server.status}; demo tools approved: {', '.join(approved)}")
