"""A private redis-server for fault tests: started, stopped (SIGKILL), paused and restarted by the
test itself, by its own pid, on one loopback port, without persistence — a restart comes back empty."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.mcp_peers import reserve_port
from usage.quota_redis import EPOCH_KEY


class RedisServer:
    def __init__(self, directory: Path) -> None:
        # Held for the server's life: no other process takes the port while Redis is down.
        self._reservation = reserve_port()
        self.port = self._reservation.getsockname()[1]
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    probe.ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._reservation.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def end_settling(self) -> None:
        """What the passage of the settle time does, without waiting for it."""
        with self.client() as client:
            client.set(EPOCH_KEY, 0)

    def pause(self, milliseconds: int) -> None:
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")
