"""OAuth 2.1 for upstream MCP servers (the MCP authorization spec): discovery (``discovery.py``),
the token-endpoint calls (``client.py``), the authorization-code flow (``flow.py``), connected
accounts' tokens (``grants.py``), machine tokens (``tokens.py``) and revocation (``revocation.py``);
docs/architecture.md tells how they fit.
Every request goes through TwinMCP's own aiohttp session, so the URL policy applies to each
document and endpoint an upstream names; the protocol rules come from the ``mcp`` SDK's models and
helpers."""

from __future__ import annotations

import aiohttp


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read until it ends or passes ``limit`` (then ``limit + 1`` bytes: the caller refuses
    it). ``content.read(n)`` alone returns whatever happens to be buffered."""
    body = b""
    while len(body) <= limit:
        more = await response.content.read(limit + 1 - len(body))
        if not more:
            break
        body += more
    return body
