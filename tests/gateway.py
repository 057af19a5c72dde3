"""A live TwinMCP gateway for tests: the real ASGI application under uvicorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests import mcp_peers


def start_gateway() -> mcp_peers.RunningPeer:
    from twinmcp.asgi import application

    return mcp_peers.serve_asgi(application, name="twinmcp-gateway", path="/").start()


def proxy_url(gateway: mcp_peers.RunningPeer, server: Any) -> str:
    return f"{gateway.base}/api/v1/external-mcp/{server.pk}/mcp"


@asynccontextmanager
async def agent(url: str, key: str, *, mode: str = "legacy", **client_kwargs: Any) -> AsyncIterator[Client]:
    """An SDK client the way an agent runs it: pointed at the proxy with its TwinMCP key."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, trust_env=False,
                              timeout=httpx2.Timeout(15.0, read=30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, **client_kwargs) as client:
        yield client


def close_gateway_connections() -> None:
    """The gateway's worker threads keep database connections open; end them so the test
    database can be dropped at the end of the session."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
