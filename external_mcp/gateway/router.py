"""The process's ASGI entry: the gateway's paths to the raw pipeline, everything else to Django,
and the lifespan that starts the cache-invalidation listener and closes pooled resources."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from external_mcp.gateway import transport
from external_mcp.gateway.call import Receive, Scope, Send
from external_mcp.gateway.pipeline import McpProxy
from twinmcp import invalidation
from usage.recorder import get_recorder

PREFIX_RE = re.compile(r"^/api/v1/external-mcp/[^/]+/mcp(?:/.*)?$", re.DOTALL)

proxy_app = McpProxy()


class Router:
    """Sends every proxy path (``/api/v1/external-mcp/<anything>/mcp…``) to the raw ASGI proxy,
    which answers a JSON 404 for those that name no server, and everything else to Django."""

    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and PREFIX_RE.match(scope["path"]):
            await proxy_app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await self.django_app(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        listener: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                listener = asyncio.ensure_future(invalidation.listen())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if listener is not None:
                    listener.cancel()
                    await asyncio.gather(listener, return_exceptions=True)
                await transport.close_session()
                await get_recorder().close()
                await send({"type": "lifespan.shutdown.complete"})
                return
