"""The benchmark's upstream: an SDK server, stateless, JSON answers, one echo tool; with ``--sse``
the same tool over the HTTP+SSE transport (at ``/sse``), for the gateway's bridge."""

from __future__ import annotations

import argparse
import logging

from mcp.server.mcpserver import MCPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sse", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = MCPServer("bench-upstream", log_level="WARNING")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    if args.sse:
        server.run("sse", host="127.0.0.1", port=args.port)
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port, streamable_http_path="/mcp",
                   json_response=True, stateless_http=True)


if __name__ == "__main__":
    main()
