"""Ready-to-paste configurations that point an agent at a TwinMCP endpoint, one per client.

Each client spells the same three facts (a name, the endpoint URL, ``Authorization: Bearer
<key>``) its own way. Claude Desktop only launches local (stdio) servers from its config file,
so it reaches a remote endpoint through ``mcp-remote``; the header goes through an environment
variable because Windows mangles spaces inside ``args``. VS Code prompts for the key instead of
storing it in the workspace's file.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

KEY_PLACEHOLDER = "<your TwinMCP API key>"


@dataclass(frozen=True)
class AgentConfig:
    client: str
    where: str
    """Where the text goes (a file, a terminal)."""
    language: str
    text: str


def agent_configs(*, name: str, url: str, key: str = KEY_PLACEHOLDER) -> list[AgentConfig]:
    """``name`` must be a plain identifier (a server prefix): it is a key in every file and a shell word."""
    bearer = f"Bearer {key}"
    desktop = {"mcpServers": {name: {
        "command": "npx", "args": ["-y", "mcp-remote", url, "--header", "Authorization:${TWINMCP_AUTH}"],
        "env": {"TWINMCP_AUTH": bearer}}}}
    cursor = {"mcpServers": {name: {"url": url, "headers": {"Authorization": bearer}}}}
    vscode = {
        "inputs": [{"type": "promptString", "id": "twinmcp-key", "description": "TwinMCP API key", "password": True}],
        "servers": {name: {"type": "http", "url": url, "headers": {"Authorization": "Bearer ${input:twinmcp-key}"}}},
    }
    claude_code = shlex.join(["claude", "mcp", "add", "--transport", "http", name, url,
                              "--header", f"Authorization: {bearer}"])
    python = PYTHON_TEMPLATE.format(url=json.dumps(url), bearer=json.dumps(bearer))
    return [
        AgentConfig("Claude Desktop", "claude_desktop_config.json (needs Node.js for npx)", "json", _json(desktop)),
        AgentConfig("Claude Code", "a terminal", "shell", claude_code),
        AgentConfig("Cursor", "~/.cursor/mcp.json or .cursor/mcp.json", "json", _json(cursor)),
        AgentConfig("VS Code", ".vscode/mcp.json (asks for the key when it starts)", "json", _json(vscode)),
        AgentConfig("Python (mcp SDK 2.x)", "a script", "python", python),
    ]


PYTHON_TEMPLATE = '''import asyncio

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    http = httpx2.AsyncClient(headers={{"Authorization": {bearer}}})
    async with http, Client(streamable_http_client({url}, http_client=http)) as client:
        for tool in (await client.list_tools()).tools:
            print(tool.name)


asyncio.run(main())
'''


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)
