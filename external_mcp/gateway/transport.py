"""The upstream side of the gateway: pooled connections, the request with the stored
credentials, and an answer's body read whole and bounded. Every aiohttp failure becomes a
``ProxyError`` that names the server, never an internal address."""

from __future__ import annotations

import asyncio
import weakref

import aiohttp
from django.conf import settings

from external_mcp import urlpolicy
from external_mcp.gateway.call import Call
from external_mcp.gateway.errors import (
    connection_failed,
    connection_needed,
    timed_out,
    too_large,
    truncated,
    upstream_error,
)
from external_mcp.mcp_client import PolicyResolver
from external_mcp.oauth.grants import ConnectionNeeded
from external_mcp.oauth.tokens import TokenUnavailable
from external_mcp.proxy_cache import ServerInfo

FORWARD_HEADERS = {
    b"accept", b"content-type", b"mcp-session-id", b"mcp-protocol-version", b"last-event-id", b"mcp-method",
    b"mcp-name",
}

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def upstream_session() -> aiohttp.ClientSession:
    """One pooled session per event loop; keep-alive shorter than uvicorn's 5 s so a pooled
    connection is never one the upstream already closed. It serves every agent, so it keeps no
    cookies: one set for an agent's call would be sent with everybody's."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(), limit=0, keepalive_timeout=4, ttl_dns_cache=10)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                        cookie_jar=aiohttp.DummyCookieJar(),
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))
        _sessions[loop] = session
    return session


async def close_session() -> None:
    """Close the running loop's pooled session, at the end of the process's lifespan."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def upstream_headers(headers: dict[bytes, bytes], call: Call) -> dict[str, str]:
    """The agent's MCP headers, the server's stored credentials and the request id; nothing else."""
    assert call.server is not None
    out = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers.items()
           if name in FORWARD_HEADERS or name.startswith(b"mcp-param-")}
    out.update(call.server.auth_headers)
    out["X-Request-Id"] = call.request_id
    return out


async def token_headers(server: ServerInfo, *, refused: dict[str, str] | None = None) -> dict[str, str]:
    """The headers carrying a token obtained for this request's server, if its scheme needs one;
    ``refused``: the ones the upstream just answered 401 to."""
    if server.token_scheme is None:
        return {}
    try:
        return await server.token_scheme.request_headers(upstream_session(), server.base_url, refused=refused)
    except ConnectionNeeded as exc:
        raise connection_needed(server, exc) from None
    except TokenUnavailable as exc:
        then = ("try again shortly" if exc.passing
                else "a workspace admin must check the server's OAuth credentials")
        raise upstream_error(server, 502, -32025, f"TwinMCP could not obtain an access token ({exc}); {then}.",
                             "credentials") from None


async def send(call: Call, headers: dict[bytes, bytes]) -> aiohttp.ClientResponse:
    """The upstream's response (its status and headers; the body is read by the relay)."""
    server = call.server
    assert server is not None
    timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
    if call.method == "GET":
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=None)
    else:
        # total covers the body too: aiohttp reads it under the same timer (a slowloris cannot outlast it).
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
    request_headers = upstream_headers(headers, call)
    session = upstream_session()
    sent = await token_headers(server)
    request_headers.update(sent)
    retried = renewed = False
    while True:
        try:
            response = await session.request(
                call.method, server.url, data=call.body or None, headers=request_headers,
                ssl=server.ssl, allow_redirects=False, timeout=timeout,
            )
            if response.status == 401 and server.token_scheme is not None and not renewed:
                response.release()  # the token was revoked or expired early: one new token, one new try
                renewed = True
                sent = await token_headers(server, refused=sent)
                request_headers.update(sent)
                continue
            call.lap("upstream")
            return response
        except aiohttp.ClientConnectorDNSError:
            raise upstream_error(server, 502, -32010, "the upstream host name does not resolve.", "dns") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise upstream_error(server, 502, -32011, "TLS handshake with the upstream failed (invalid or untrusted "
                                 "certificate).", "tls", detail=str(exc)) from None
        except urlpolicy.UrlPolicyError as exc:
            # The reason names the address the host resolved to: for the log and the admin, not the agent.
            raise upstream_error(server, 502, -32012, "the upstream address is refused by the URL policy.",
                                 "policy", detail=str(exc)) from None
        except aiohttp.ClientConnectorError as exc:
            if not retried:
                retried = True
                continue  # nothing was sent: repeating is safe
            raise upstream_error(server, 502, -32013, "cannot connect to the upstream server.", "connect",
                                 detail=str(exc)) from None
        except TimeoutError:
            raise timed_out(server, timeout_s) from None
        except aiohttp.ClientError as exc:
            raise connection_failed(server, exc) from None


async def read_whole(call: Call, response: aiohttp.ClientResponse) -> bytes:
    """The whole body, or a ProxyError: cut short, over the cap, stalled. ``content.read(n)``
    would return only what happens to be buffered."""
    server = call.server
    assert server is not None
    cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
    if response.content_length is not None and response.content_length > cap:
        raise too_large(server)
    chunks: list[bytes] = []
    try:
        async for chunk in response.content.iter_any():
            call.bytes_out += len(chunk)
            if call.bytes_out > cap:
                raise too_large(server)
            chunks.append(chunk)
    except aiohttp.ClientPayloadError as exc:
        raise truncated(server, exc) from None
    except TimeoutError:
        raise timed_out(server, settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000) from None
    except aiohttp.ClientError as exc:
        raise connection_failed(server, exc) from None
    return b"".join(chunks)
