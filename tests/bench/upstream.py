"""The benchmark's upstream: an SDK server, stateless, JSON answers, one echo tool."""

from __future__ import annotations

import argparse
import logging

from mcp.server.mcpserver import MCPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = MCPServer("bench-upstream", log_level="WARNING")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    server.run("streamable-http", host="127.0.0.1", port=args.port, streamable_http_path="/mcp",
               json_response=True, stateless_http=True)


if __name__ == "__main__":
    main()
