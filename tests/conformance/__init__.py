"""The official MCP conformance suite run against an SDK-built fixture server (see README.md)."""
