"""The machine's floor for a proxy: a bare ASGI app on the gateway's own server stack (uvicorn,
httptools, uvloop) that forwards each POST to the upstream over one pooled aiohttp session and
sends the answer back. No Django, no authentication, quota, event or log: what any Python proxy
pays for two HTTP hops on this machine, measured in the same run as the gateway."""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn

FORWARDED = ("content-type", "accept", "mcp-protocol-version", "mcp-session-id", "mcp-method", "mcp-name")


class PassThrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
                    await send({"type": "lifespan.startup.complete"})
            await self.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.decode(): value.decode() for name, value in scope["headers"]
                   if name.decode() in FORWARDED}
        async with self.session.post(self.upstream, data=body, headers=headers) as response:
            answer = await response.read()
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.headers.get("content-type", "").encode()),
                                    (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(PassThrough(args.upstream), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
