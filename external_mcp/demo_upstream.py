"""The demo MCP server that ``make run`` starts and registers: a real upstream on loopback,
built with the official SDK, so the demo exercises health checks and the proxy for real. It
serves the same tools over Streamable HTTP at ``/mcp`` and over the older HTTP+SSE transport at
``/sse`` (what many deployed servers still speak), registered as two servers."""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.applications import Starlette


def build_server() -> MCPServer:
    server = MCPServer("twinmcp-demo", version="1.0.0", instructions="Demo tools for TwinMCP.")

    @server.tool(description="Echo the given text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @server.tool(description="Count to n, reporting progress at each step.")
    async def count(n: int, ctx: Context) -> str:
        n = max(1, min(n, 20))
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i} of {n}")
        return f"counted to {n}"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning")


def build_app() -> Starlette:
    """Both transports on one origin; the Streamable HTTP app's lifespan runs its session manager."""
    streamable = build_server().streamable_http_app(streamable_http_path="/mcp")
    legacy = build_server().sse_app(sse_path="/sse", message_path="/messages/")
    return Starlette(routes=[*streamable.routes, *legacy.routes], lifespan=streamable.router.lifespan_context)


if __name__ == "__main__":
    main()
