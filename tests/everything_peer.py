"""The official TypeScript ``server-everything`` in its HTTP+SSE mode, on 127.0.0.1: an HTTP+SSE
server built on another SDK and framework (Node, Express) than the Python peers, so the bridge is
held to what a deployed server of that kind actually sends.

Installed once into ``.cache/everything`` (``npm_cache``) and run with the machine's Node.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests import npm_cache

PACKAGE = "@modelcontextprotocol/server-everything@2026.8.31"
ENTRY = "node_modules/@modelcontextprotocol/server-everything/dist/index.js"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def everything_sse() -> Iterator[str]:
    """The server's event stream URL while it runs (``…/sse``; it posts to ``/message``)."""
    entry = npm_cache.installed("everything", PACKAGE, ENTRY)
    port = _free_port()
    proc = subprocess.Popen(["node", str(entry), "sse"], env={**os.environ, "PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server-everything did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/sse"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
