"""The process's ASGI entry: the gateway's paths to the raw pipeline, everything else to Django,
and the lifespan that starts the cache-invalidation listener and closes pooled resources."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from external_mcp.gateway import aggregate, bridge, transport
from external_mcp.gateway.aggregate import AggregateEndpoint
from external_mcp.gateway.call import Receive, Scope, Send
from external_mcp.gateway.pipeline import McpProxy
from external_mcp.gateway.sessions import StoreDown
from twinmcp import invalidation
from usage.recorder import get_recorder

PREFIX_RE = re.compile(r"^/api/v1/external-mcp/[^/]+/mcp(?:/.*)?$", re.DOTALL)
SWEEP_SECONDS = 60.0

logger = logging.getLogger("external_mcp.proxy")

proxy_app = McpProxy()
aggregate_app = AggregateEndpoint()


class Router:
    """Sends every proxy path (``/api/v1/external-mcp/<anything>/mcp…``) to the raw ASGI proxy,
    which answers a JSON 404 for those that name no server, and everything else to Django."""

    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and aggregate.PATH_RE.match(scope["path"]):
            await aggregate_app(scope, receive, send)
            return
        if scope["type"] == "http" and PREFIX_RE.match(scope["path"]):
            await proxy_app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await self.django_app(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        background: list[asyncio.Future[None]] = []
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                background = [asyncio.ensure_future(invalidation.listen()), asyncio.ensure_future(sweep_sessions())]
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await bridge.close_all()
                await transport.close_session()
                await get_recorder().close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def sweep_sessions() -> None:
    """For the life of the process: end idle agent sessions (each claimed by one process)."""
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            await aggregate.sweep()
        except StoreDown as exc:
            logger.warning("idle agent sessions not swept (%s); next try in %g s", exc, SWEEP_SECONDS)
        except Exception:  # noqa: BLE001 - the sweeper outlives one bad record
            logger.exception("idle agent sessions not swept")
