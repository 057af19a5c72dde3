"""MCP Inspector v2's CLI, the official debugging client, as an agent pointed at the gateway.

Installed once into ``.cache/inspector`` (``npm_cache``); it needs Node >= 22.19, which the
conformance installer (``.ci/conformance.sh``) provides.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests import npm_cache
from tests.conformance.runner import ensure_cli

PACKAGE = "@modelcontextprotocol/inspector@2.12.0"
CLI = "node_modules/@modelcontextprotocol/inspector/clients/cli/build/index.js"


def _node22() -> str:
    wrapper = Path(ensure_cli()).read_text()
    found = re.search(r'exec "([^"]+/node)"', wrapper)
    if found is None:
        raise RuntimeError("the conformance wrapper names no Node binary")
    return found.group(1)


def inspect(url: str, key: str, *args: str) -> Any:
    """One Inspector CLI command against ``url`` (Streamable HTTP) with a TwinMCP key; its JSON output."""
    cli, node = npm_cache.installed("inspector", PACKAGE, CLI), _node22()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, "MCP_CATALOG_PATH": str(Path(home) / "mcp.json")}
        done = subprocess.run([node, str(cli), "--transport", "http", "--server-url", url,
                               "--header", f"Authorization: Bearer {key}", *args],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"the Inspector printed no JSON (exit {done.returncode}):\n{done.stdout}\n"
                             f"{done.stderr}") from None
