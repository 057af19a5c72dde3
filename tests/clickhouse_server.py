"""A private ClickHouse server (Debian's clickhouse-server package) on loopback ports, with its data
under the test's temporary directory, a password-protected user for the sink and the default user
for the tests' own checks."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.mcp_peers import reserve_port

BINARY = shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin")
USER = "loader"
PASSWORD = "s3cret: pass/word"

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/server.err.log</errorlog></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>53687091</mark_cache_size>
  <uncompressed_cache_size>53687091</uncompressed_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
"""
_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></default>
    <{user}><password>{password}</password><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></{user}>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""


class ClickHouseServer:
    def __init__(self, directory: Path) -> None:
        # Held while the server lives, so no other process takes them (ClickHouse binds with SO_REUSEADDR).
        self._reservations = [reserve_port(), reserve_port()]
        self.http_port, self.tcp_port = (s.getsockname()[1] for s in self._reservations)
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ClickHouseServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "config.xml"
        config.write_text(_CONFIG.format(dir=self.directory, http_port=self.http_port, tcp_port=self.tcp_port))
        (self.directory / "users.xml").write_text(_USERS.format(user=USER, password=PASSWORD))
        self.proc = subprocess.Popen([str(BINARY), f"--config-file={config}"], cwd=self.directory,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "server.err.log")
                raise RuntimeError("clickhouse-server exited: " + (log.read_text()[-2000:] if log.exists() else ""))
            try:
                if self.query("SELECT 1").strip() == "1":
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("clickhouse-server did not answer within 60 s")

    def query(self, sql: str) -> str:
        """Run ``sql`` as the default user; raises RuntimeError with ClickHouse's message on an error."""
        request = urllib.request.Request(f"{self.url}/?" + urllib.parse.urlencode({"query": sql}), data=b"")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(exc.read().decode()) from None

    def rows(self, sql: str) -> list[list[str]]:
        return [line.split("\t") for line in self.query(sql + " FORMAT TSV").splitlines()]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for reservation in self._reservations:
            reservation.close()
