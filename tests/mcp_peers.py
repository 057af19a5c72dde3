"""Real MCP upstream servers on 127.0.0.1 for tests, built with the official SDK (``mcp`` 2.3).

Health checks and the proxy talk to upstreams over real sockets with real HTTP stacks, so the
only honest way to test them is against real servers: each peer here is a uvicorn server in its
own thread and event loop, serving an SDK ``MCPServer`` (or a deliberately broken ASGI app),
with an outermost middleware that records every inbound request so tests can assert what the
client actually put on the wire.

Every factory returns an unstarted :class:`RunningPeer`; it starts on ``with``/``async with``
(or an explicit ``start()``) and is stopped on exit::

    with default_peer() as peer:                # sync test
        ...
    async with bearer_peer("s3cret") as peer:   # async test (start/stop run off the event loop)
        async with peer.sdk_client(headers={"Authorization": "Bearer s3cret"}) as client:
            await client.list_tools()

``peer.stop()``/``peer.start()`` (or ``astop``/``astart``) take an upstream down and bring it
back on the same port, with fresh state, like a process restart. Peers only ever bind 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hmac
import json
import socket
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Literal

import httpx2
import mcp_types as types
import trustme
import uvicorn
from mcp import Client
from mcp.client.session import MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.streamable_http import GET_STREAM_KEY
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "LOOPBACK",
    "MCP_PATH",
    "SERVER_CARD_MEDIA_TYPE",
    "AppFactory",
    "GarbageKind",
    "HandshakeRejection",
    "MutablePeer",
    "RecordedRequest",
    "RunningPeer",
    "SlowPeer",
    "api_key_peer",
    "bearer_peer",
    "build_demo_server",
    "build_paginated_server",
    "default_peer",
    "garbage_peer",
    "handshake_only_peer",
    "json_peer",
    "mcp_peer",
    "mtls_peer",
    "mutable_peer",
    "paginated_peer",
    "reserve_port",
    "running",
    "server_card_peer",
    "serve_asgi",
    "slow_peer",
    "stateless_peer",
    "status_peer",
    "tls_peer",
    "untrusted_tls_peer",
]

LOOPBACK = "127.0.0.1"
"""The only address peers bind: tests must never open anything beyond loopback."""

MCP_PATH = "/mcp"

SERVER_CARD_MEDIA_TYPE = "application/mcp-server-card+json"

# Deadlines only a broken peer reaches: a loaded CI machine can take seconds to start a thread.
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0
_WAIT_TIMEOUT_S = 30.0
# Long enough for a finished client to close cleanly, short enough that an open SSE stream
# (an SDK client's standing GET) cannot hold a test hostage while its upstream is "going down".
_GRACEFUL_SHUTDOWN_S = 0.5

AppFactory = Callable[["RunningPeer"], ASGIApp]
"""Builds a fresh ASGI app for each (re)start: the SDK's session manager can only run once."""


# --------------------------------------------------------------------------------------------
# Request recording
# --------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One inbound HTTP request as the peer saw it, recorded before any auth or MCP handling.

    ``headers`` folds repeated header lines with ``", "`` (keys lowercased); ``raw_headers``
    keeps the lines as sent, for tests about duplicated headers. ``body`` fills in as the
    request body arrives, and ``status`` once the response starts.
    """

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    scheme: str
    body: bytes = b""
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def rpc_method(self) -> str | None:
        """The JSON-RPC ``method`` of the body, when the body is a JSON-RPC request/notification."""
        try:
            decoded = json.loads(self.body)
        except ValueError:
            return None
        return decoded.get("method") if isinstance(decoded, dict) else None


DRAIN_SCOPE_KEY = "mcp_peers.drain"
"""Where inner layers (the slow gate) find the peer's drain event in the ASGI scope."""


class _Drain:
    """Lets a stopping peer end its open streams the way a draining server does.

    Without it uvicorn waits out its grace period and then cancels every streaming response,
    logging each one as an "Exception in ASGI application". With it, open SSE streams see a
    client disconnect, finish, and the response is closed with a final empty chunk.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()  # bound lazily to the peer's loop on first wait (3.10+)

    async def race(self, awaitable: Any) -> tuple[bool, Any]:
        """Await ``awaitable`` unless draining starts first; returns (completed, result)."""
        if self.event.is_set():
            return False, None
        task = asyncio.ensure_future(awaitable)
        waiter = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return True, task.result()
        return False, None


class _RecordingMiddleware:
    """Outermost ASGI layer so 401s, 406s and rejected handshakes are recorded too."""

    def __init__(self, app: ASGIApp, sink: list[RecordedRequest], drain: _Drain) -> None:
        self.app = app
        self.sink = sink
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        folded: dict[str, str] = {}
        for key, value in raw:
            folded[key] = f"{folded[key]}, {value}" if key in folded else value
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b"").decode("latin-1"),
            headers=folded,
            raw_headers=raw,
            scheme=scope.get("scheme", "http"),
        )
        self.sink.append(record)
        started = finished = False

        async def recording_receive() -> Message:
            completed, message = await self.drain.race(receive())
            if not completed:
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                record.body += message.get("body", b"")
            return message

        async def recording_send(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                record.response_headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
                }
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        await self.app({**scope, DRAIN_SCOPE_KEY: self.drain}, recording_receive, recording_send)
        if started and not finished and self.drain.event.is_set():
            # A stream the drain ended: close the chunked body like a server that shuts down politely.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body to the inner app, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol for the raw ASGI peers, so uvicorn does not log them as broken."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_simple(
    send: Send, status: int, body: bytes, content_type: str | None, extra: Sequence[tuple[str, str]] = ()
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# Running any ASGI app on loopback
# --------------------------------------------------------------------------------------------


class _ThreadedUvicorn(uvicorn.Server):
    """uvicorn without signal handling (it runs off the main thread) and with an instant stop.

    Stock uvicorn polls ``should_exit`` every 100 ms; waking the main loop explicitly keeps a
    test that stops and restarts upstreams from paying that on every stop.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake = asyncio.Event()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header when counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def wake(self) -> None:
        self._wake.set()


@dataclass
class _TLSMaterial:
    """Certificates for one TLS peer; kept across restarts so clients keep trusting the same CA."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    require_client_cert: bool = False
    client_cert: trustme.LeafCert | None = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if self.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port() -> socket.socket:
    """A loopback port held by a bound socket that never listens: connecting to it is refused.

    While it is open the kernel hands the port to no other ``bind(0)`` (nor to a plain ``bind``),
    so nothing else on the machine — another test run included — can start answering there.
    A listener with ``SO_REUSEADDR`` can still bind the same port beside it: that is how a peer
    restarts on its port. Use ``reserve_port().getsockname()[1]`` for "a port nothing listens on";
    a port picked by binding and closing a socket can be taken by anyone before it is used.
    """
    return _bound_socket(0)


_LIVE_PEERS: set[RunningPeer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_leftover_peers() -> None:
    """A test that forgot its ``with`` must not keep ports or threads past the session."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE_PEERS)
    for peer in leftovers:
        with contextlib.suppress(Exception):
            peer.stop()


class RunningPeer:
    """An ASGI app served by uvicorn on 127.0.0.1 in its own thread and event loop.

    The app is rebuilt by ``app_factory`` on every start, so ``stop()`` then ``start()`` behaves
    like a real process restart on the same port: sessions are gone, the tool set is whatever
    the factory builds. ``requests`` survives restarts (``clear_requests()`` resets it).

    The port is reserved (``reserve_port``) from the first start until the peer object is
    garbage-collected: while stopped, the URL refuses connections and no other process can
    take the port, so "the upstream is down" and "it came back on the same port" hold even
    with other suites running on the machine.
    """

    def __init__(
        self,
        app_factory: AppFactory,
        *,
        name: str = "peer",
        path: str = MCP_PATH,
        tls: _TLSMaterial | None = None,
        uvicorn_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.requests: list[RecordedRequest] = []
        self._app_factory = app_factory
        self._tls = tls
        self._uvicorn_options = dict(uvicorn_options or {})
        self._port: int | None = None
        self._server: _ThreadedUvicorn | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._drain: _Drain | None = None
        self._lifecycle = threading.Lock()
        self._reservation: socket.socket | None = None
        self.stop_was_forced = False
        """Whether the last stop had to cut requests still running after uvicorn's grace period."""

    # -- addresses ---------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        own_tls = any(self._uvicorn_options.get(k) for k in ("ssl_certfile", "ssl_context_factory"))
        return "https" if self._tls is not None or own_tls else "http"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} has not been started yet")
        return self._port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def base(self) -> str:
        """The origin, e.g. ``http://127.0.0.1:41234``."""
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint, e.g. ``http://127.0.0.1:41234/mcp``."""
        return f"{self.base}{self.path}"

    # -- TLS material ------------------------------------------------------------------------

    @property
    def ca(self) -> trustme.CA | None:
        """The CA that issued this peer's server certificate (``None`` for plain HTTP)."""
        return self._tls.ca if self._tls is not None else None

    @property
    def ca_pem(self) -> str | None:
        return self._tls.ca.cert_pem.bytes().decode() if self._tls is not None else None

    @property
    def client_cert_pem(self) -> str | None:
        """A client certificate the peer accepts (mTLS peers only), issued by ``ca``."""
        cert = self._tls.client_cert if self._tls is not None else None
        return cert.cert_chain_pems[0].bytes().decode() if cert is not None else None

    @property
    def client_key_pem(self) -> str | None:
        cert = self._tls.client_cert if self._tls is not None else None
        return cert.private_key_pem.bytes().decode() if cert is not None else None

    def client_ssl_context(self, *, trust: bool = True, client_cert: bool = True) -> ssl.SSLContext:
        """An SSL context for aiohttp (``ssl=``) or httpx2 (``verify=``) talking to this peer.

        ``trust`` adds this peer's CA; ``client_cert`` presents the mTLS client certificate
        when the peer has one. With ``trust=False`` the context uses only the system store,
        which is what a client that was never told about the test CA would do.
        """
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self._tls is not None and trust:
            self._tls.ca.configure_trust(ctx)
        if self._tls is not None and client_cert and self._tls.client_cert is not None:
            self._tls.client_cert.configure_cert(ctx)
        return ctx

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The peer's own event loop, for ``asyncio.run_coroutine_threadsafe`` from tests."""
        if self._loop is None or not self.is_running:
            raise RuntimeError(f"{self.name} is not running")
        return self._loop

    def start(self) -> RunningPeer:
        """Start serving; on a restart the previous port is bound again."""
        with self._lifecycle:
            if self.is_running:
                return self
            if self._reservation is None:
                reservation = self._reservation = reserve_port()
                self._port = reservation.getsockname()[1]
                weakref.finalize(self, reservation.close)
            sock = _bound_socket(self.port)
            self._failure = None
            drain = self._drain = _Drain()
            try:
                app = _RecordingMiddleware(self._app_factory(self), self.requests, drain)
            except BaseException:
                sock.close()
                raise
            options: dict[str, Any] = {
                "lifespan": "on",
                "loop": "asyncio",
                "log_config": None,
                "access_log": False,
                "timeout_graceful_shutdown": _GRACEFUL_SHUTDOWN_S,
                "timeout_keep_alive": 5,
            }
            if self._tls is not None:
                tls = self._tls
                options["ssl_context_factory"] = lambda _config, _default: tls.server_context()
            options.update(self._uvicorn_options)
            config = uvicorn.Config(app, host=LOOPBACK, port=self._port, **options)
            server = _ThreadedUvicorn(config)
            ready = threading.Event()

            def run() -> None:
                # asyncio.Runner cancels leftover tasks (sse-starlette's shutdown watcher, cut
                # streams) before closing the loop, so nothing is "destroyed while pending".
                with asyncio.Runner() as runner:
                    self._loop = runner.get_loop()
                    ready.set()
                    try:
                        runner.run(server.serve(sockets=[sock]))
                    except BaseException as exc:  # SystemExit on startup failure included: report, don't die
                        self._failure = exc
                    finally:
                        sock.close()

            thread = threading.Thread(target=run, name=f"mcp-peer-{self.name}-{self._port}", daemon=True)
            self._server, self._thread = server, thread
            thread.start()
            ready.wait(_START_TIMEOUT_S)
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    self._stop_locked()
                    raise RuntimeError(f"{self.name} failed to start on port {self._port}") from self._failure
                time.sleep(0.002)
            with _LIVE_LOCK:
                _LIVE_PEERS.add(self)
            return self

    def stop(self) -> None:
        """Stop serving and free the port; in-flight streams get a short grace period, then are cut."""
        with self._lifecycle:
            self._stop_locked()

    def _stop_locked(self) -> None:
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None:
            return
        drain = self._drain
        server.should_exit = True
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may be closing already
                if drain is not None:
                    loop.call_soon_threadsafe(drain.event.set)
                loop.call_soon_threadsafe(server.wake)
        thread.join(_STOP_TIMEOUT_S)
        self.stop_was_forced = thread.is_alive()
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT_S)
        self._server = self._thread = self._loop = None
        with _LIVE_LOCK:
            _LIVE_PEERS.discard(self)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {2 * _STOP_TIMEOUT_S} s")

    def restart(self) -> RunningPeer:
        self.stop()
        return self.start()

    def __enter__(self) -> RunningPeer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> RunningPeer:
        # Off the event loop: start/stop block on a thread, and stopping must not freeze the
        # test's own loop while it still holds client connections to this peer.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> RunningPeer:
        return await asyncio.to_thread(self.start)

    async def arestart(self) -> RunningPeer:
        return await asyncio.to_thread(self.restart)

    # -- helpers for tests -------------------------------------------------------------------

    def clear_requests(self) -> None:
        self.requests.clear()

    def requests_to(self, path: str | None = None, *, rpc_method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests filtered by path (default: the MCP endpoint) and JSON-RPC method."""
        wanted = self.path if path is None else path
        return [
            r
            for r in list(self.requests)
            if r.path == wanted and (rpc_method is None or r.rpc_method == rpc_method)
        ]

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = _WAIT_TIMEOUT_S
    ) -> RecordedRequest:
        """Wait until a recorded request matches: requests arrive on the peer's thread, not the test's."""
        deadline = time.monotonic() + timeout
        while True:
            for record in list(self.requests):
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching request reached {self.name} within {timeout} s")
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def sdk_client(
        self,
        *,
        mode: str = "legacy",
        headers: Mapping[str, str] | None = None,
        trust: bool = True,
        client_cert: bool = True,
        timeout: float = 10.0,
        message_handler: MessageHandlerFnT | None = None,
        read_timeout_seconds: float | None = None,
    ) -> AsyncIterator[Client]:
        """An SDK ``Client`` for this peer with headers and TLS settings a plain URL cannot carry.

        ``mode`` is ``"legacy"`` (initialize handshake), ``"auto"`` (server/discover probe, then
        fallback) or ``"2026-07-28"`` (stateless era, no probe).
        """
        verify: ssl.SSLContext | bool = self.client_ssl_context(trust=trust, client_cert=client_cert)
        async with httpx2.AsyncClient(
            verify=verify,
            headers=dict(headers or {}),
            timeout=httpx2.Timeout(timeout, read=max(timeout, 30.0)),
            trust_env=False,
        ) as http:
            transport = streamable_http_client(self.url, http_client=http)
            async with Client(
                transport, mode=mode, message_handler=message_handler, read_timeout_seconds=read_timeout_seconds
            ) as client:
                yield client

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<{type(self).__name__} {self.name} {where} running={self.is_running}>"


def serve_asgi(
    app: ASGIApp,
    *,
    name: str = "asgi",
    path: str = MCP_PATH,
    uvicorn_options: Mapping[str, Any] | None = None,
) -> RunningPeer:
    """Wrap any restartable ASGI app as a peer; ``uvicorn_options`` go to ``uvicorn.Config``.

    SDK apps cannot be restarted (their session manager runs once): build those with
    ``RunningPeer(lambda peer: ..., name=...)`` instead, which also gives the app its own URL.
    ``ssl_keyfile``/``ssl_certfile``/``ssl_cert_reqs``/``ssl_ca_certs`` in ``uvicorn_options``
    serve your own certificate files (``peer.url`` then says https; ``peer.ca`` stays ``None``).
    """
    return RunningPeer(lambda _peer: app, name=name, path=path, uvicorn_options=uvicorn_options)


# --------------------------------------------------------------------------------------------
# SDK server builders
# --------------------------------------------------------------------------------------------


def _transport_security() -> TransportSecuritySettings:
    """What the SDK enables by itself on loopback, plus https origins so TLS peers behave the same."""
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=[
            "http://127.0.0.1:*",
            "http://localhost:*",
            "http://[::1]:*",
            "https://127.0.0.1:*",
            "https://localhost:*",
            "https://[::1]:*",
        ],
    )


def build_demo_server(name: str = "peer-default", **server_kwargs: Any) -> MCPServer:
    """The upstream most tests want: a few tools covering plain results, numbers, progress and latency."""
    server: MCPServer = MCPServer(
        name, version="1.0.0", instructions="Test upstream.", log_level="WARNING", **server_kwargs
    )

    @server.tool(description="Echo the given text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @server.tool(description="Count to n, reporting progress at each step.")
    async def count(n: int, ctx: Context) -> str:
        n = max(0, min(n, 1000))
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i} of {n}")
        return f"counted to {n}"

    @server.tool(description="Echo the given text back after delay_ms milliseconds.")
    async def slow_echo(text: str, delay_ms: int) -> str:
        await asyncio.sleep(max(0, delay_ms) / 1000)
        return text

    return server


def _streamable_app(
    server: MCPServer | Server[Any], *, json_response: bool = False, stateless: bool = False
) -> ASGIApp:
    return server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        json_response=json_response,
        stateless_http=stateless,
        transport_security=_transport_security(),
    )


def _localhost_tls(*, require_client_cert: bool = False, ca: trustme.CA | None = None) -> _TLSMaterial:
    ca = ca or trustme.CA()
    client = None
    if require_client_cert:
        client = ca.issue_cert("mcp-test-client@example.com", common_name="mcp-test-client")
    return _TLSMaterial(
        ca=ca,
        server_cert=ca.issue_cert(LOOPBACK, "localhost"),
        require_client_cert=require_client_cert,
        client_cert=client,
    )


# --------------------------------------------------------------------------------------------
# Peer factories
# --------------------------------------------------------------------------------------------


def mcp_peer(
    *,
    json_response: bool = False,
    stateless: bool = False,
    tls: bool = False,
    name: str = "peer-default",
    server_factory: Callable[[], MCPServer | Server[Any]] | None = None,
    uvicorn_options: Mapping[str, Any] | None = None,
) -> RunningPeer:
    """The general SDK peer the named variants are made of: pick response mode, state and TLS."""
    build = server_factory or (lambda: build_demo_server(name))
    return RunningPeer(
        lambda _peer: _streamable_app(build(), json_response=json_response, stateless=stateless),
        name=name,
        tls=_localhost_tls() if tls else None,
        uvicorn_options=uvicorn_options,
    )


def default_peer() -> RunningPeer:
    """Stateful sessions with SSE answers: what ``MCPServer.run("streamable-http")`` deploys."""
    return mcp_peer(name="peer-default")


def json_peer() -> RunningPeer:
    """Stateful, but every answer is one ``application/json`` body (progress is dropped)."""
    return mcp_peer(json_response=True, name="peer-json")


def stateless_peer() -> RunningPeer:
    """No sessions, JSON answers: how benchmark/horizontally scaled upstreams are deployed."""
    return mcp_peer(json_response=True, stateless=True, name="peer-stateless")


class _CookieSetter:
    """Sets a session cookie on every answer, as load balancers with sticky sessions do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"set-cookie", b"upstream_sticky=node-1; Path=/")]}
            await send(message)

        await self.app(scope, receive, with_cookie)


def cookie_peer() -> RunningPeer:
    """``stateless_peer`` behind a sticky-session cookie."""
    return RunningPeer(
        lambda _peer: _CookieSetter(_streamable_app(build_demo_server("peer-cookie"), json_response=True,
                                                    stateless=True)),
        name="peer-cookie",
    )


def tls_peer() -> RunningPeer:
    """The default peer over HTTPS with a certificate for 127.0.0.1 from ``peer.ca``."""
    return mcp_peer(tls=True, name="peer-tls")


# -- handshake-era only ---------------------------------------------------------------------

HandshakeRejection = Literal["missing_session", "unsupported_version", "method_not_found"]


class _HandshakeOnlyGate:
    """Makes a 2.3 server answer 2026-07-28 traffic the way a 1.x (handshake-era) server did.

    The 2.3 SDK serves ``server/discover`` and the stateless era on every server, so an "old"
    upstream has to be simulated. Styles, as seen on the wire from the python SDK 1.x:

    - ``missing_session`` (stateful 1.x): 400, ``{"id": "server-error", "error": {"code":
      -32600, "message": "Bad Request: Missing session ID"}}`` for anything but ``initialize``
      without ``Mcp-Session-Id``.
    - ``unsupported_version`` (stateless 1.x): 400, -32600 ``Bad Request: Unsupported protocol
      version: 2026-07-28. Supported versions: ...``.
    - ``method_not_found``: 200 JSON-RPC -32601 for ``server/discover`` (a server that parses the
      request but has no such method).

    Requests inside a session at a handshake version pass through: the SDK itself then answers
    ``server/discover`` with -32601, as the 1.x SDK did.
    """

    def __init__(self, app: ASGIApp, style: HandshakeRejection) -> None:
        self.app = app
        self.style = style

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        version = headers.get("mcp-protocol-version")
        has_session = "mcp-session-id" in headers
        body = await read_body(receive)
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        method = decoded.get("method") if isinstance(decoded, dict) else None
        request_id = decoded.get("id") if isinstance(decoded, dict) else None
        modern_version = version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS
        if modern_version or method == "server/discover":
            if self.style == "method_not_found" and method == "server/discover":
                await self._json(send, 200, request_id, -32601, "Method not found")
                return
            if self.style == "missing_session" and not has_session and method != "initialize":
                await self._json(send, 400, "server-error", -32600, "Bad Request: Missing session ID")
                return
            if modern_version:
                supported = ", ".join(HANDSHAKE_PROTOCOL_VERSIONS)
                message = f"Bad Request: Unsupported protocol version: {version}. Supported versions: {supported}"
                await self._json(send, 400, "server-error", -32600, message)
                return
        await self.app(scope, _replaying(body, receive), send)

    @staticmethod
    async def _json(send: Send, status: int, request_id: Any, code: int, message: str) -> None:
        payload = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
        await _send_simple(send, status, json.dumps(payload).encode(), "application/json")


def handshake_only_peer(
    *, rejection: HandshakeRejection = "missing_session", json_response: bool = False
) -> RunningPeer:
    """An upstream that predates 2026-07-28: discover/stateless-era requests are refused like 1.x did."""

    def factory(_peer: RunningPeer) -> ASGIApp:
        app = _streamable_app(build_demo_server("peer-handshake-only"), json_response=json_response)
        return _HandshakeOnlyGate(app, rejection)

    return RunningPeer(factory, name="peer-handshake-only")


# -- authentication -------------------------------------------------------------------------


class _StaticTokenVerifier:
    """Accepts exactly one bearer token, the way an introspecting resource server would."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="mcp-test-client", scopes=[])
        return None


def bearer_peer(token: str, *, json_response: bool = False) -> RunningPeer:
    """The SDK's own resource-server auth: 401 + ``WWW-Authenticate: Bearer ...`` unless the token matches.

    The challenge carries ``resource_metadata=`` pointing at this peer's
    ``/.well-known/oauth-protected-resource/mcp``, which the SDK serves (its
    ``authorization_servers`` names this same origin, where nothing answers: no OAuth flow).
    """

    def factory(peer: RunningPeer) -> ASGIApp:
        auth = AuthSettings(
            issuer_url=peer.base,  # type: ignore[arg-type]
            resource_server_url=peer.url,  # type: ignore[arg-type]
            validate_token_resource=False,
        )
        server = build_demo_server("peer-bearer", token_verifier=_StaticTokenVerifier(token), auth=auth)
        return _streamable_app(server, json_response=json_response)

    return RunningPeer(factory, name="peer-bearer")


def sse_peer(*, token: str | None = None, api_key: tuple[str, str] | None = None, mtls: bool = False,
             name: str = "peer-sse", server_factory: Callable[[], MCPServer] | None = None) -> RunningPeer:
    """The SDK's HTTP+SSE server (the 2024-11-05 transport): ``GET /sse`` opens the stream, whose
    first event names ``/messages/?session_id=…`` for the posts. With ``token``, both need it as a
    bearer token (the SDK's own resource-server auth); with ``api_key`` (header, value), that
    header; with ``mtls``, a client certificate (as ``mtls_peer``)."""

    def factory(peer: RunningPeer) -> ASGIApp:
        auth: dict[str, Any] = {}
        if token is not None:
            auth = {"token_verifier": _StaticTokenVerifier(token), "auth": AuthSettings(
                issuer_url=peer.base, resource_server_url=peer.url,  # type: ignore[arg-type]
                validate_token_resource=False)}
        server = server_factory() if server_factory is not None else build_demo_server(name, **auth)
        app = server.sse_app(transport_security=_transport_security())
        return _ApiKeyGate(app, *api_key) if api_key is not None else app

    return RunningPeer(factory, name=name, path="/sse", tls=_localhost_tls(require_client_cert=True) if mtls else None)


class _ApiKeyGate:
    """401 without the header, 403 with a wrong value: the usual API-gateway split."""

    def __init__(self, app: ASGIApp, header: str, value: str) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")
        self.value = value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = [v for k, v in scope["headers"] if k.lower() == self.header]
        if not presented:
            body = json.dumps({"error": "missing_api_key", "error_description": "API key required"}).encode()
            await _send_simple(send, 401, body, "application/json")
            return
        if len(presented) != 1 or not hmac.compare_digest(presented[0], self.value):
            body = json.dumps({"error": "invalid_api_key", "error_description": "API key not accepted"}).encode()
            await _send_simple(send, 403, body, "application/json")
            return
        await self.app(scope, receive, send)


def api_key_peer(header: str, value: str, *, json_response: bool = False) -> RunningPeer:
    """The default tools behind a static API-key header (e.g. ``X-API-Key``)."""

    def factory(_peer: RunningPeer) -> ASGIApp:
        app = _streamable_app(build_demo_server("peer-api-key"), json_response=json_response)
        return _ApiKeyGate(app, header, value)

    return RunningPeer(factory, name="peer-api-key")


# -- TLS ------------------------------------------------------------------------------------


def mtls_peer(*, json_response: bool = False) -> RunningPeer:
    """HTTPS that refuses the TLS handshake without a client certificate issued by ``peer.ca``.

    ``client_cert_pem``/``client_key_pem`` are such a certificate; ``ca_pem`` is what a client
    must trust. Without a client certificate the failure shows up as a TLS alert
    (``certificate required``) or a reset, depending on TLS version and timing.
    """
    return RunningPeer(
        lambda _peer: _streamable_app(build_demo_server("peer-mtls"), json_response=json_response),
        name="peer-mtls",
        tls=_localhost_tls(require_client_cert=True),
    )


def untrusted_tls_peer(*, expired: bool = False) -> RunningPeer:
    """HTTPS whose certificate a normal client rejects.

    Default: a valid certificate from a private CA nobody trusts (``peer.ca`` is that CA, so a
    test can show that trusting it explicitly fixes verification). ``expired=True``: the
    certificate expired yesterday, so even a client that trusts ``peer.ca`` must refuse it.
    """
    ca = trustme.CA()
    if expired:
        now = datetime.now(UTC)
        cert = ca.issue_cert(
            LOOPBACK, "localhost", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        )
    else:
        cert = ca.issue_cert(LOOPBACK, "localhost")
    return RunningPeer(
        lambda _peer: _streamable_app(build_demo_server("peer-untrusted-tls")),
        name="peer-expired-tls" if expired else "peer-untrusted-tls",
        tls=_TLSMaterial(ca=ca, server_cert=cert),
    )


# -- slow -----------------------------------------------------------------------------------


class _DelayGate:
    """Reads the whole request, then sits on it: the client sees a connected, silent server."""

    def __init__(self, app: ASGIApp, delay_s: float) -> None:
        self.app = app
        self.delay_s = delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        drain: _Drain | None = scope.get(DRAIN_SCOPE_KEY)
        if self.delay_s > 0:
            if drain is None:
                await asyncio.sleep(self.delay_s)
            elif not (await drain.race(asyncio.sleep(self.delay_s)))[0]:
                # Stopping: answer like a draining server instead of leaving uvicorn to invent a 500.
                await _send_simple(send, 503, b"Service Unavailable", "text/plain", [("connection", "close")])
                return
        await self.app(scope, _replaying(body, receive), send)


class SlowPeer(RunningPeer):
    """A stateless JSON MCP server that answers every HTTP request only after ``delay_s``.

    ``delay_s`` can be changed while running (e.g. to 0 to watch a health check recover).
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        super().__init__(self._build, name="peer-slow")

    def _build(self, _peer: RunningPeer) -> ASGIApp:
        return _LiveDelayGate(self, _streamable_app(build_demo_server("peer-slow"), json_response=True, stateless=True))


class _LiveDelayGate(_DelayGate):
    def __init__(self, owner: SlowPeer, app: ASGIApp) -> None:
        super().__init__(app, owner.delay_s)
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.delay_s = self.owner.delay_s
        await super().__call__(scope, receive, send)


def slow_peer(delay_s: float) -> SlowPeer:
    return SlowPeer(delay_s)


# -- garbage and plain statuses --------------------------------------------------------------

GarbageKind = Literal["html", "json_not_rpc", "invalid_json", "sse_garbage", "empty"]


def _garbage_app(kind: GarbageKind) -> ASGIApp:
    """200 OK to everything, with a body no MCP client can use."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await read_body(receive)
        if kind == "html":
            body = b"<!doctype html><html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>"
            await _send_simple(send, 200, body, "text/html; charset=utf-8")
        elif kind == "json_not_rpc":
            await _send_simple(send, 200, b'{"status": "ok", "items": [1, 2, 3]}', "application/json")
        elif kind == "invalid_json":
            await _send_simple(send, 200, b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": [', "application/json")
        elif kind == "sse_garbage":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                }
            )
            chunks = (b"event: message\r\ndata: this is not json\r\n\r\n", b'data: {"half": \r\n\r\n', b": bye\r\n\r\n")
            for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await _send_simple(send, 200, b"", None)

    return app


def garbage_peer(kind: GarbageKind = "html") -> RunningPeer:
    """Something on the port that answers 200 but is not an MCP server (a web page, a REST API, ...)."""
    return RunningPeer(lambda _peer: _garbage_app(kind), name=f"peer-garbage-{kind}")


_REDIRECTS = {301, 302, 303, 307, 308}


def _status_app(
    status: int, location: str | None, body: bytes, content_type: str, headers: Mapping[str, str]
) -> ASGIApp:
    extra = [("location", location)] if location is not None else []
    extra += list(headers.items())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await read_body(receive)
        await _send_simple(send, status, body, content_type, extra)

    return app


def status_peer(
    status: int,
    *,
    location: str | None = None,
    body: bytes | None = None,
    content_type: str = "text/plain; charset=utf-8",
    headers: Mapping[str, str] | None = None,
) -> RunningPeer:
    """Every request gets ``status``; redirects default to the cloud metadata address.

    The redirect target is only written into ``Location``; nothing here connects to it —
    following it is exactly what the client under test must refuse to do.
    """
    if location is None and status in _REDIRECTS:
        location = "http://169.254.169.254/"
    if body is None:
        try:
            body = HTTPStatus(status).phrase.encode()
        except ValueError:
            body = b""
    return RunningPeer(
        lambda _peer: _status_app(status, location, body, content_type, dict(headers or {})),
        name=f"peer-status-{status}",
    )


# -- mutable tool set ------------------------------------------------------------------------


@dataclass
class _ToolSpec:
    fn: Callable[..., Any]
    description: str | None
    title: str | None = None


class _SessionTracker:
    """Remembers handshake-era sessions so a tool change can be pushed to each one's GET stream."""

    def __init__(self) -> None:
        self.sessions: dict[str, ServerSession] = {}

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        request = ctx.request
        if isinstance(request, Request) and ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            session_id = request.headers.get("mcp-session-id")
            if session_id:
                self.sessions[session_id] = ctx.session
        return await call_next(ctx)


class MutablePeer(RunningPeer):
    """An upstream whose tools change under the client's feet (schema drift / rug-pull tests).

    Changes are applied on the peer's own loop (no races with a request in flight) and then
    announced: ``notifications/tools/list_changed`` on every open handshake-era session's GET
    stream, and a tools-changed event on 2026-07-28 ``subscriptions/listen`` streams. The
    initialize result advertises ``tools.listChanged: true``. The tool set survives restarts.
    """

    def __init__(self, *, json_response: bool = False, stateless: bool = False) -> None:
        self._json_response = json_response
        self._stateless = stateless
        self._bus = InMemorySubscriptionBus()
        self._tracker = _SessionTracker()
        self.server: MCPServer = MCPServer(
            "peer-mutable", version="1.0.0", log_level="WARNING", subscriptions=self._bus
        )
        self.server.middleware.append(self._tracker)
        # MCPServer has no public knob for listChanged in the initialize result; the streamable
        # HTTP runner asks the low-level server for its options, so answer that call instead.
        lowlevel = self.server._lowlevel_server
        original = lowlevel.create_initialization_options

        def initialization_options(
            notification_options: NotificationOptions | None = None,
            experimental_capabilities: dict[str, dict[str, Any]] | None = None,
            extensions: dict[str, dict[str, Any]] | None = None,
        ) -> InitializationOptions:
            return original(
                notification_options or NotificationOptions(tools_changed=True), experimental_capabilities, extensions
            )

        lowlevel.create_initialization_options = initialization_options  # type: ignore[method-assign]
        self._specs: dict[str, _ToolSpec] = {}
        self._registered: list[str] = []

        def echo(text: str) -> str:
            return text

        def add(a: float, b: float) -> float:
            return a + b

        self._specs["echo"] = _ToolSpec(echo, "Echo the given text back.")
        self._specs["add"] = _ToolSpec(add, "Add two numbers.")
        self._sync_tools()
        self.notifications_sent = 0
        super().__init__(self._build, name="peer-mutable")

    def _build(self, _peer: RunningPeer) -> ASGIApp:
        self._tracker.sessions.clear()  # a restart forgets every session
        return _streamable_app(self.server, json_response=self._json_response, stateless=self._stateless)

    def _sync_tools(self) -> None:
        """Rebuild the server's registry from the specs, keeping a stable order."""
        for name in self._registered:
            self.server.remove_tool(name)
        for name, spec in self._specs.items():
            self.server.add_tool(spec.fn, name=name, description=spec.description, title=spec.title)
        self._registered = list(self._specs)

    def _apply(self, change: Callable[[], None], notify: bool) -> None:
        if not self.is_running:
            change()
            self._sync_tools()
            return

        async def apply_and_announce() -> None:
            change()
            self._sync_tools()
            if notify:
                await self._announce()

        asyncio.run_coroutine_threadsafe(apply_and_announce(), self.loop).result(_STOP_TIMEOUT_S)

    async def _announce(self) -> None:
        for session_id, session in list(self._tracker.sessions.items()):
            try:
                await session.send_tool_list_changed()
            except Exception:  # a session that ended since: forget it, like a real server would
                self._tracker.sessions.pop(session_id, None)
        await self._bus.publish(ToolsListChanged())
        self.notifications_sent += 1

    @property
    def tool_names(self) -> list[str]:
        return list(self._specs)

    def set_tool_description(self, name: str, text: str, *, notify: bool = True) -> None:
        if name not in self._specs:
            raise KeyError(name)

        def change() -> None:
            self._specs[name].description = text

        self._apply(change, notify)

    def add_tool(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        title: str | None = None,
        notify: bool = True,
    ) -> None:
        tool_name = name or fn.__name__

        def change() -> None:
            self._specs[tool_name] = _ToolSpec(fn, description, title)

        self._apply(change, notify)

    def remove_tool(self, name: str, *, notify: bool = True) -> None:
        if name not in self._specs:
            raise KeyError(name)
        self._apply(lambda: self._specs.pop(name), notify)

    @property
    def known_sessions(self) -> list[str]:
        """Handshake-era session ids seen since the last start (announcements go to each)."""
        return list(self._tracker.sessions)

    @property
    def listening_sessions(self) -> list[str]:
        """Sessions whose standalone GET stream is open, i.e. that an announcement reaches now.

        The SDK answers the GET with 200 a moment before it registers the stream, and drops a
        notification sent in between: wait for the session to appear here, not for the 200.
        """
        instances = self.server.session_manager._server_instances
        return [session_id for session_id, transport in list(instances.items())
                if GET_STREAM_KEY in transport._request_streams]


def mutable_peer(*, json_response: bool = False, stateless: bool = False) -> MutablePeer:
    return MutablePeer(json_response=json_response, stateless=stateless)


# -- pagination -----------------------------------------------------------------------------


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        offset = json.loads(base64.urlsafe_b64decode(cursor.encode()))["offset"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MCPError(code=types.INVALID_PARAMS, message="Invalid cursor") from exc
    if not isinstance(offset, int) or offset < 0:
        raise MCPError(code=types.INVALID_PARAMS, message="Invalid cursor")
    return offset


def build_paginated_server(n_tools: int = 120, page_size: int = 50) -> Server[Any]:
    """A low-level server: ``MCPServer`` ignores the cursor and always lists everything in one page."""
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    tools = [
        types.Tool(name=f"tool_{i:03d}", description=f"Echo tool number {i}.", input_schema=schema)
        for i in range(n_tools)
    ]
    by_name = {tool.name: tool for tool in tools}

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        offset = _decode_cursor(params.cursor) if params is not None and params.cursor else 0
        end = offset + page_size
        return types.ListToolsResult(
            tools=tools[offset:end], next_cursor=_encode_cursor(end) if end < len(tools) else None
        )

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name not in by_name:
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")
        text = str((params.arguments or {}).get("text", ""))
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"{params.name}:{text}")])

    return Server(
        "peer-paginated",
        version="1.0.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        get_tool_input_schema=lambda name: by_name[name].input_schema if name in by_name else None,
    )


def paginated_peer(n_tools: int = 120, page_size: int = 50, *, json_response: bool = False) -> RunningPeer:
    """``tools/list`` in pages with an opaque ``nextCursor``; ``tool_NNN`` each echo ``text``."""
    return RunningPeer(
        lambda _peer: _streamable_app(build_paginated_server(n_tools, page_size), json_response=json_response),
        name="peer-paginated",
    )


# -- server card -----------------------------------------------------------------------------

CardSource = Mapping[str, Any] | Callable[[RunningPeer], Mapping[str, Any]]


def server_card_peer(card: CardSource | None = None, *, catalog: CardSource | None = None) -> RunningPeer:
    """The default peer plus discovery documents: ``GET /mcp/server-card`` and ``/.well-known/mcp/catalog.json``.

    ``card``/``catalog`` may be dicts or callables taking the running peer (to embed its URL).
    Defaults describe this peer. The catalog shape is not standardised; the default is
    ``{"servers": [{"name", "url", "serverCard"}]}``.
    """

    def resolve(source: CardSource | None, peer: RunningPeer, default: Callable[[], dict[str, Any]]) -> Any:
        if source is None:
            return default()
        return dict(source(peer)) if callable(source) else dict(source)

    def factory(peer: RunningPeer) -> ASGIApp:
        server = build_demo_server("peer-server-card")

        def default_card() -> dict[str, Any]:
            return {
                "name": "peer-server-card",
                "version": "1.0.0",
                "description": "Test upstream.",
                "remotes": [{"type": "streamable-http", "url": peer.url}],
            }

        def default_catalog() -> dict[str, Any]:
            return {"servers": [{"name": "peer-server-card", "url": peer.url, "serverCard": f"{peer.url}/server-card"}]}

        @server.custom_route(f"{MCP_PATH}/server-card", methods=["GET"])
        async def server_card(_request: Request) -> Response:
            return JSONResponse(resolve(card, peer, default_card), media_type=SERVER_CARD_MEDIA_TYPE)

        @server.custom_route("/.well-known/mcp/catalog.json", methods=["GET"])
        async def server_catalog(_request: Request) -> Response:
            return JSONResponse(resolve(catalog, peer, default_catalog))

        return _streamable_app(server)

    return RunningPeer(factory, name="peer-server-card")


@contextlib.contextmanager
def running(*peers: RunningPeer) -> Iterator[tuple[RunningPeer, ...]]:
    """Start several peers together and stop them all, even if one fails to start."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(peer) for peer in peers)
