"""A live TwinMCP gateway for tests: the real ASGI application under uvicorn on 127.0.0.1, in a
thread of the test process (``start_gateway``) or as separate worker processes (``GatewayProcess``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests import mcp_peers


def start_gateway() -> mcp_peers.RunningPeer:
    from twinmcp.asgi import application

    return mcp_peers.serve_asgi(application, name="twinmcp-gateway", path="/").start()


def register(admin: Any, peer: Any, *, approve: bool = True, name: str = "up", **kwargs: Any) -> Any:
    """A server registered at ``peer``, checked (the check must pass) and, by default, with every
    tool approved: what an admin does before agents may call it."""
    from external_mcp import catalog, health, services
    from external_mcp.models import ExternalMcpServer

    server = services.server_create(workspace=admin.workspace, actor=admin.user, name=name, base_url=peer.url,
                                    **kwargs)
    result, server = health.check_now(ExternalMcpServer.objects.select_related("credential").get(pk=server.pk))
    assert result.ok, result.error_message
    if approve:
        catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    return server


def proxy_url(gateway: mcp_peers.RunningPeer, server: Any) -> str:
    return f"{gateway.base}/api/v1/external-mcp/{server.pk}/mcp"


@asynccontextmanager
async def agent(url: str, key: str, *, mode: str = "legacy", **client_kwargs: Any) -> AsyncIterator[Client]:
    """An SDK client the way an agent runs it: pointed at the proxy with its TwinMCP key."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, trust_env=False,
                              timeout=httpx2.Timeout(15.0, read=30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, **client_kwargs) as client:
        yield client


async def count_with_progress(client: Client, tool: str, n: int) -> tuple[Any, list[float]]:
    """The result of counting to ``n`` with ``tool`` (the peers' ``count``) and the progress values
    the agent received for it, in order."""
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    return await client.call_tool(tool, {"n": n}, progress_callback=on_progress), progress


def close_gateway_connections() -> None:
    """The gateway's worker threads keep database connections open; end them so the test
    database can be dropped at the end of the session."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")


class GatewayProcess:
    """The gateway as production runs it: ``uvicorn --workers N`` in its own process group, on the
    test database (its data must be committed: ``django_db(transaction=True)``) and the Redis the
    test chooses. Faults are real: ``kill_worker()`` sends SIGKILL to one worker. Its clock runs
    from the test's own ``now`` (``tests/clocked_asgi.py``): use it with the ``midday`` fixture."""

    def __init__(self, *, redis_url: str, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.workers = workers
        self.extra_env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reservation: socket.socket | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="twinmcp-gateway-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, server: Any) -> str:
        return f"{self.base}/api/v1/external-mcp/{server.pk}/mcp"

    def start(self) -> GatewayProcess:
        from django.db import connection

        db = connection.settings_dict
        # Held while the gateway runs: uvicorn binds beside it (SO_REUSEADDR), nobody else can.
        self._reservation = mcp_peers.reserve_port()
        self.port = self._reservation.getsockname()[1]
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": self.redis_url, "DEBUG": "false", "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "false", "EXTERNAL_MCP_ALLOWED_PROTOCOLS": "https,http",
            "EXTERNAL_MCP_ALLOWED_NETWORKS": "127.0.0.1/32", "LOG_LEVEL": "WARNING",
            "TWINMCP_TEST_CLOCK": datetime.now(UTC).isoformat(), **self.extra_env,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.clocked_asgi:application", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", str(self.workers), "--no-access-log"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        supervised = self.workers if self.workers > 1 else 0  # one worker runs without a supervisor
        while len(self.worker_pids()) < supervised or not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output()
                self.stop()  # a gateway that did not start must not outlive the test
                raise RuntimeError(f"the gateway did not start:\n{output}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def kill_worker(self) -> int:
        pid = self.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self._reservation is not None:
            self._reservation.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
