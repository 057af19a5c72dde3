"""A small MCP client for health checks, connection tests and discovery, over Streamable HTTP or
the older HTTP+SSE transport (``legacy_sse``), or whichever of the two answers (``auto``).

Built on aiohttp (the proxy's client, see docs/architecture.md) rather than the SDK client so
that every step has its own timeout, no redirect is ever followed, the URL policy is applied
again to every address at connection time, and failures map to a few classes an admin can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from external_mcp import legacy_sse, sse, urlpolicy
from external_mcp.choices import Transport
from external_mcp.oauth.tokens import TokenUnavailable
from external_mcp.storable import display_text

if TYPE_CHECKING:  # the schemes fetch OAuth tokens through this module's sessions
    from external_mcp.auth_schemes import AuthScheme

logger = logging.getLogger(__name__)

MODERN_VERSION = "2026-07-28"
HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
ACCEPTED_HANDSHAKE_VERSIONS = (*HANDSHAKE_VERSIONS, "2024-11-05")
MAX_TOOL_PAGES = 50
MAX_TOOLS = 5000
MAX_BODY_BYTES = 8 * 1024 * 1024
CLIENT_INFO = {"name": "twinmcp-health", "version": "1.0"}
CARD_PATHS = ("/.well-known/mcp/catalog.json", "/.well-known/mcp.json", "/.well-known/mcp")

ERROR_CLASSES = ("dns", "connect", "tls", "timeout", "auth", "http", "protocol", "policy", "credentials", "record")

HINTS = {
    "dns": "The host name does not resolve; check the URL.",
    "connect": "Nothing answered at that address; is the server running and reachable from TwinMCP?",
    "tls": "The TLS handshake failed: an invalid, expired or untrusted certificate, or a client certificate "
    "the server refused.",
    "timeout": "The server did not answer in time.",
    "auth": "The server refused the credentials; rotate the secret.",
    "http": "The server answered with an unexpected HTTP status; check the MCP endpoint URL.",
    "protocol": "The server did not speak MCP over the transport expected (handshake failed); check the URL and "
    "the server's transport.",
    "policy": "The URL is refused by TwinMCP's URL policy.",
    "credentials": "The stored credentials cannot be used.",
    "record": "TwinMCP could not store this check's result. Approved tools whose definition it could not verify "
    "are quarantined until a check is recorded; if this repeats, tell the TwinMCP operators (the logs have the "
    "details).",
}


class CheckError(Exception):
    def __init__(self, error_class: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.status = status


@dataclass
class CheckResult:
    ok: bool
    error_class: str = ""
    error_message: str = ""
    protocol_version: str = ""
    era: str = ""
    server_name: str = ""
    server_version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    instructions: str = ""
    # tools/list entries as received: any JSON value (the catalog judges them, see catalog.read_listing).
    tools: list[Any] = field(default_factory=list)
    card: dict[str, Any] | None = None
    card_url: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0
    transport: str = ""
    """The transport the handshake succeeded on (``Transport``'s concrete values)."""
    list_changed_seen: bool = False

    @property
    def hint(self) -> str:
        return HINTS.get(self.error_class, "")


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    step: float = 10.0
    total: float = 30.0


class PolicyResolver(AbstractResolver):
    """Resolves through the OS and refuses any address the URL policy refuses, so a name
    rebound to an internal address after registration is caught when connecting."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            urlpolicy.check_address(result["host"], host=host)
        return results

    async def close(self) -> None:
        await self._inner.close()


def new_session(*, limit: int = 100, limit_per_host: int = 0) -> aiohttp.ClientSession:
    """One session per event loop, shared by all checks: pooled keep-alive connections."""
    connector = aiohttp.TCPConnector(
        resolver=PolicyResolver(), limit=limit, limit_per_host=limit_per_host, ttl_dns_cache=10,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False,
                                 cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))


_ids = itertools.count(1)


class McpProbe:
    """One health check of one upstream: discovery, handshake, tools/list, session close."""

    def __init__(self, url: str, scheme: AuthScheme, session: aiohttp.ClientSession, timeouts: Timeouts,
                 transport: str = Transport.AUTO) -> None:
        self.url = url
        self.transport = transport
        self.stream: legacy_sse.EventStream | None = None
        self.endpoint = ""
        """On HTTP+SSE, where messages are posted (named by the stream's first event)."""
        self.scheme = scheme
        self.session = session
        self.timeouts = timeouts
        self.auth_headers = scheme.headers()
        self.ssl: ssl.SSLContext | bool = scheme.ssl_context() if url.startswith("https:") else False
        self.result = CheckResult(ok=False)
        self.session_id: str | None = None

    async def run(self) -> CheckResult:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeouts.total):
                urlpolicy.validate_url(self.url, resolve=False)
                if self.scheme.fetches_token:
                    await self._step("token", self._token)
                await self._step("discovery", self._discover_card)
                await self._step("handshake", self._handshake)
                await self._step("tools", self._list_tools)
            self.result.ok = True
        except CheckError as exc:
            self.result.error_class, self.result.error_message = exc.error_class, str(exc)
        except urlpolicy.UrlPolicyError as exc:
            self.result.error_class, self.result.error_message = "policy", str(exc)
        except TimeoutError:
            self.result.error_class = "timeout"
            self.result.error_message = f"No complete answer within {self.timeouts.total:g} s."
        except Exception as exc:  # noqa: BLE001 - any answer, however malformed, is a failed check
            logger.warning("unexpected answer from %s", self.url, exc_info=True)
            self.result.error_class = "protocol"
            self.result.error_message = f"The server's answer could not be understood ({type(exc).__name__})."
        finally:
            # Upstream text (JSON-RPC error messages) may hold NUL or lone surrogates.
            self.result.error_message = display_text(self.result.error_message, 2000)
            if self.session_id:
                await self._step("close", self._close_session)
            if self.stream is not None:
                self.stream.close()
            self.result.total_ms = round((time.perf_counter() - started) * 1000, 1)
        return self.result

    async def _token(self) -> None:
        try:
            self.auth_headers = {**self.auth_headers, **await self.scheme.check_headers(self.session, self.url)}
        except TokenUnavailable as exc:
            raise CheckError(exc.error_class, str(exc)) from None

    async def _step(self, name: str, func: Any) -> None:
        started = time.perf_counter()
        try:
            await func()
        finally:
            self.result.timings_ms[name] = round((time.perf_counter() - started) * 1000, 1)

    # --- HTTP -------------------------------------------------------------------------------------------------

    async def _request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                       body: dict[str, Any] | None = None) -> tuple[int, str, bytes, Mapping[str, str]]:
        all_headers = {**self.auth_headers, **(headers or {})}
        timeout = aiohttp.ClientTimeout(total=self.timeouts.step, sock_connect=self.timeouts.connect)
        data = json.dumps(body).encode() if body is not None else None
        with self._failures(method, url):
            async with self.session.request(method, url, headers=all_headers, data=data, ssl=self.ssl,
                                            allow_redirects=False, timeout=timeout) as response:
                payload = await self._read(response)
                return response.status, response.headers.get("Content-Type", ""), payload, response.headers

    @contextlib.contextmanager
    def _failures(self, method: str, url: str) -> Iterator[None]:
        """aiohttp's failures as the few classes an admin can act on."""
        try:
            yield
        except urlpolicy.UrlPolicyError:
            raise
        except aiohttp.ClientConnectorDNSError:
            raise CheckError("dns", f"{urlsplit(url).hostname} does not resolve.") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CheckError("tls", f"Invalid upstream certificate: {_ssl_reason(exc.certificate_error)}.") from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise CheckError("tls", f"TLS handshake failed: {_ssl_reason(exc)}.") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise CheckError("timeout", f"No answer within {self.timeouts.step:g} s ({method} {urlsplit(url).path}).") \
                from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else "connection failed"
            raise CheckError("connect", f"Cannot connect to {exc.host}:{exc.port}: {reason}.") from None
        except aiohttp.ClientError as exc:
            raise CheckError("connect", f"Connection error: {type(exc).__name__}.") from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise CheckError("protocol", f"The answer is larger than {MAX_BODY_BYTES // 1048576} MiB.")
            chunks.append(chunk)
        return b"".join(chunks)

    def _status_error(self, status: int, what: str) -> CheckError:
        if status in (401, 403):
            return CheckError("auth", f"Authentication refused ({status}) on {what}.", status=status)
        if 300 <= status < 400:
            return CheckError("http", f"HTTP {status} redirect on {what}; redirects are not followed.", status=status)
        return CheckError("http", f"HTTP {status} on {what}.", status=status)

    async def _rpc(self, method: str, params: dict[str, Any] | None, *, headers: dict[str, str],
                   accept_errors: bool = False) -> tuple[int, dict[str, Any] | None, Mapping[str, str]]:
        """Send a JSON-RPC request; return (status, message, headers). The message is the
        response (result or error) whose id matches, from a JSON or an SSE answer."""
        request_id = next(_ids)
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        status, content_type, payload, response_headers = await self._request(
            "POST", self.endpoint or self.url, headers={**base, **headers}, body=body)
        if not 200 <= status < 300:
            if accept_errors and status in (400, 404, 405, 406, 415, 422):
                return status, None, response_headers
            raise self._status_error(status, method)
        if self.stream is not None:
            message = await self._streamed_response(request_id, method)
        else:
            message = self._find_response(content_type, payload, request_id, method)
        if "error" in message and not accept_errors:
            error = message["error"] if isinstance(message["error"], dict) else {}
            raise CheckError("protocol", f"{method} failed: {str(error.get('message', 'error'))[:200]}")
        return status, message, response_headers

    def _find_response(self, content_type: str, payload: bytes, request_id: int, method: str) -> dict[str, Any]:
        kind = content_type.split(";")[0].strip().lower()
        if kind == "application/json":
            messages = [_json(payload, method)]
        elif kind == "text/event-stream":
            messages = [_json(data.encode(), method) for data in sse.data_of(payload) if data.strip()]
        else:
            raise CheckError("protocol", f"Unexpected content type {kind or '(none)'!r} for {method}.")
        for message in itertools.chain.from_iterable(m if isinstance(m, list) else [m] for m in messages):
            if self._is_response(message, request_id, method):
                return message
        raise CheckError("protocol", f"No JSON-RPC response to {method} in the answer.")

    def _is_response(self, message: Any, request_id: int, method: str) -> bool:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            raise CheckError("protocol", f"The answer to {method} is not JSON-RPC 2.0.")
        if message.get("method") == "notifications/tools/list_changed":
            self.result.list_changed_seen = True
        return message.get("id") == request_id and ("result" in message or "error" in message)

    async def _streamed_response(self, request_id: int, method: str) -> dict[str, Any]:
        """On HTTP+SSE the response comes on the stream, after whatever the server sends first."""
        assert self.stream is not None
        while True:
            try:
                with self._failures("GET", self.url):
                    message = await self.stream.next_message()
            except legacy_sse.StreamBroken as exc:
                raise CheckError("protocol", f"The server's event stream is not HTTP+SSE: {exc}.") from None
            if message is None:
                raise CheckError("protocol", f"The server's event stream ended before the response to {method}.")
            for item in message if isinstance(message, list) else [message]:
                if self._is_response(item, request_id, method):
                    return item

    # --- steps -------------------------------------------------------------------------------------------------

    async def _discover_card(self) -> None:
        """Optional discovery documents: a 404 (or any non-JSON answer) means "no card"."""
        parts = urlsplit(self.url)
        origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        card = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/server-card", parts.query, ""))
        candidates = [card] + [origin + path for path in CARD_PATHS]
        for url in candidates:
            status, content_type, payload, _ = await self._request("GET", url, headers={"Accept": "application/json"})
            if status in (401, 403):
                raise self._status_error(status, "the discovery document")
            if status == 200 and "json" in content_type:
                try:
                    card = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(card, dict):
                    self.result.card, self.result.card_url = card, url
                    return

    def _modern(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        params = dict(params or {})
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
            "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        return params, {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": method}

    async def _handshake(self) -> None:
        if self.transport == Transport.SSE:
            await self._sse_handshake()
            return
        refused = await self._streamable_handshake()
        if refused is None:
            return
        if self.transport != Transport.AUTO:
            raise CheckError("protocol", f"Handshake failed: the URL refuses MCP's POST requests (HTTP {refused}). If "
                                         "this is an HTTP+SSE server, choose that transport (or Automatic) and its "
                                         "stream's URL.")
        try:
            await self._sse_handshake()
        except CheckError as exc:
            if exc.error_class not in ("http", "protocol"):
                raise
            raise CheckError(exc.error_class, f"The URL refuses MCP's POST requests (HTTP {refused}), and it is not an "
                                              f"HTTP+SSE server's stream either: {exc}", status=exc.status) from None

    async def _streamable_handshake(self) -> int | None:
        """Streamable HTTP; the refusing status when every POST was refused with 400, 404 or 405,
        which the spec reads as "not this transport" (404 or 405 at once: no initialize would pass)."""
        params, headers = self._modern("server/discover")
        status, message, _ = await self._rpc("server/discover", params, headers=headers, accept_errors=True)
        result = (message or {}).get("result")
        versions = result.get("supportedVersions") if isinstance(result, dict) else None
        if isinstance(versions, list) and MODERN_VERSION in versions:
            meta = result.get("_meta")
            info = meta.get("io.modelcontextprotocol/serverInfo") if isinstance(meta, dict) else None
            self._record(MODERN_VERSION, "stateless", info, result)
            return None
        if message is None and status in (404, 405):
            return status
        refusals = 0
        for version in HANDSHAKE_VERSIONS:
            params = {"protocolVersion": version, "capabilities": {}, "clientInfo": CLIENT_INFO}
            status, message, response_headers = await self._rpc("initialize", params, headers={},
                                                                 accept_errors=True)
            if await self._initialized(message, response_headers):
                return None
            refusals += message is None and status in (400, 404, 405)
        if refusals == len(HANDSHAKE_VERSIONS):
            return status
        raise CheckError("protocol", "Handshake failed: the server accepted neither server/discover nor initialize.")

    async def _sse_handshake(self) -> None:
        """HTTP+SSE: open the stream, learn the message endpoint, then initialize over it."""
        await self._step("stream", self._open_stream)
        for version in ACCEPTED_HANDSHAKE_VERSIONS:
            params = {"protocolVersion": version, "capabilities": {}, "clientInfo": CLIENT_INFO}
            _, message, response_headers = await self._rpc("initialize", params, headers={}, accept_errors=True)
            if await self._initialized(message, response_headers):
                return
        raise CheckError("protocol", "Handshake failed: the server's HTTP+SSE endpoint accepted no initialize.")

    async def _initialized(self, message: dict[str, Any] | None, response_headers: Mapping[str, str]) -> bool:
        """An initialize response taken: the version checked, the facts recorded, the session confirmed."""
        result = (message or {}).get("result")
        if not isinstance(result, dict):
            return False
        negotiated = result.get("protocolVersion")
        if negotiated not in ACCEPTED_HANDSHAKE_VERSIONS:
            raise CheckError("protocol", f"The server offered protocol version {str(negotiated)[:40]!r}, "
                                         "which TwinMCP does not speak.")
        if self.stream is None:
            self.session_id = response_headers.get("Mcp-Session-Id")
        self._record(negotiated, "handshake", result.get("serverInfo"), result)
        await self._notify_initialized()
        return True

    async def _open_stream(self) -> None:
        headers = {**self.auth_headers, "Accept": "text/event-stream"}
        # No total: the stream stays open for the whole check (which has its own bound); each read has one.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.step)
        with self._failures("GET", self.url):
            response = await self.session.get(self.url, headers=headers, ssl=self.ssl, allow_redirects=False,
                                              timeout=timeout)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if response.status != 200 or kind != "text/event-stream":
            response.release()
            if response.status != 200:
                raise self._status_error(response.status, "the event stream (GET)")
            raise CheckError("protocol", f"GET {urlsplit(self.url).path or '/'} answered "
                                         f"{kind or '(no content type)'!r}, not an event stream: this URL is not an "
                                         "HTTP+SSE server's stream.")
        self.stream = legacy_sse.EventStream(response, max_event_bytes=MAX_BODY_BYTES)
        try:
            with self._failures("GET", self.url):
                self.endpoint = await self.stream.endpoint(self.url)
        except legacy_sse.StreamBroken as exc:
            raise CheckError("protocol", f"The server's event stream is not HTTP+SSE: {exc}.") from None
        urlpolicy.validate_url(self.endpoint, resolve=False)

    def _record(self, version: str, era: str, info: Any, result: Mapping[str, Any]) -> None:
        info = info if isinstance(info, dict) else {}
        self.result.protocol_version, self.result.era = version, era
        self.result.transport = Transport.SSE if self.stream is not None else Transport.STREAMABLE_HTTP
        self.result.server_name = display_text(str(info.get("name", "")), 200)
        self.result.server_version = display_text(str(info.get("version", "")), 100)
        capabilities = result.get("capabilities")
        self.result.capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.result.instructions = display_text(str(result.get("instructions") or ""), 2000)

    def _session_headers(self) -> dict[str, str]:
        headers = {"MCP-Protocol-Version": self.result.protocol_version}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def _notify_initialized(self) -> None:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   **self._session_headers()}
        body = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        status, _, _, _ = await self._request("POST", self.endpoint or self.url, headers=headers, body=body)
        if status >= 400:
            raise self._status_error(status, "notifications/initialized")

    async def _list_tools(self) -> None:
        cursor: str | None = None
        tools: list[dict[str, Any]] = []
        for _ in range(MAX_TOOL_PAGES):
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            if self.result.era == "stateless":
                params, headers = self._modern("tools/list", params)
            else:
                headers = self._session_headers()
            _, message, _ = await self._rpc("tools/list", params or None, headers=headers)
            result = (message or {}).get("result")
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise CheckError("protocol", "tools/list returned no tools array.")
            tools.extend(result["tools"])
            if len(tools) > MAX_TOOLS:
                raise CheckError("protocol", f"More than {MAX_TOOLS} tools.")
            cursor = result.get("nextCursor")
            if not cursor:
                break
        else:
            raise CheckError("protocol", f"tools/list did not end after {MAX_TOOL_PAGES} pages.")
        self.result.tools = tools

    async def _close_session(self) -> None:
        # Closing is a courtesy: the check's verdict is already made.
        with contextlib.suppress(CheckError, urlpolicy.UrlPolicyError):
            await self._request("DELETE", self.url, headers=self._session_headers())


async def check(url: str, scheme: AuthScheme, *, session: aiohttp.ClientSession,
                timeouts: Timeouts | None = None, transport: str = Transport.AUTO) -> CheckResult:
    return await McpProbe(url, scheme, session, timeouts or Timeouts(), transport).run()


def _json(payload: bytes, method: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        raise CheckError("protocol", f"The answer to {method} is not valid JSON.") from None
    except RecursionError:
        raise CheckError("protocol", f"The answer to {method} is nested too deeply to parse.") from None


def _ssl_reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message
    reason = getattr(exc, "reason", None) or getattr(getattr(exc, "__cause__", None), "reason", None)
    return str(reason or exc or "unknown TLS error").lower()
