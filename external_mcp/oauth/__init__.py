"""OAuth 2.1 for upstream MCP servers (the MCP authorization spec): discovery first; the token
flows follow (docs/plans/oauth-upstreams.md). Every request goes through TwinMCP's own aiohttp
session, so the URL policy applies to each document and endpoint an upstream names; the protocol
rules come from the ``mcp`` SDK's models and helpers."""
