"""The official TypeScript ``server-everything`` in its HTTP+SSE mode, on 127.0.0.1: an HTTP+SSE
server built on another SDK and framework (Node, Express) than the Python peers, so the bridge is
held to what a deployed server of that kind actually sends.

The package is installed once with npm from the npm registry into ``.cache/everything`` (ignored
by git) and run with the machine's Node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "@modelcontextprotocol/server-everything@2026.8.31"
DIR = ROOT / ".cache" / "everything"
ENTRY = DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def ensure_installed() -> Path:
    if ENTRY.is_file():
        return ENTRY
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the HTTP+SSE interoperability test needs Node and npm")
    DIR.mkdir(parents=True, exist_ok=True)
    (DIR / ".gitignore").write_text("*\n")
    subprocess.run([npm, "install", "--prefix", str(DIR), "--no-audit", "--no-fund", "--no-save", PACKAGE],
                   check=True, capture_output=True, timeout=600)
    return ENTRY


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def everything_sse() -> Iterator[str]:
    """The server's event stream URL while it runs (``…/sse``; it posts to ``/message``)."""
    entry = ensure_installed()
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
