"""What an agent sends, checked before anything reaches an upstream: the Host and Origin, the
path, the TwinMCP key, the server, the body and its JSON-RPC messages, and the governance of
the tools it calls."""

from __future__ import annotations

import asyncio
import functools
import re
import uuid

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http.request import split_domain_port, validate_host
from mcp.shared.inbound import decode_header_value

from external_mcp.gateway.call import Call, Receive
from external_mcp.gateway.errors import ProxyError, client_disconnected, connection_needed
from external_mcp.jsonrpc import InvalidMessage, is_request, messages_of
from external_mcp.proxy_cache import ApiKeyError, KeyInfo, ServerInfo, get_key, get_server, tool_refusal
from twinmcp.apikeys import parse_authorization
from usage.models import Outcome

PATH_RE = re.compile(r"^/api/v1/external-mcp/([0-9a-fA-F-]{36})/mcp/?$")
METHODS = ("GET", "POST", "DELETE")


def allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def check_host(headers: dict[bytes, bytes]) -> None:
    """DNS-rebinding protection: the gateway answers only for its own names."""
    host = headers.get(b"host", b"")
    if not served(host):
        raise ProxyError(421, -32600, f"Host {host.decode('latin-1')!r} is not served here.")
    origin = headers.get(b"origin")
    if origin is not None and not served(origin.split(b"://", 1)[-1]):
        raise ProxyError(403, -32600, "Origin not allowed.")


@functools.lru_cache(maxsize=256)
def served(host: bytes) -> bool:
    """Whether a Host (or an Origin's host) is one of ``ALLOWED_HOSTS``; remembered per value, as every
    request asks it again (forgotten when the setting changes)."""
    domain, _ = split_domain_port(host.decode("latin-1"))
    return bool(domain) and validate_host(domain, allowed_hosts())


@receiver(setting_changed)
def _hosts_changed(*, setting: str, **kwargs: object) -> None:
    if setting in ("ALLOWED_HOSTS", "DEBUG"):
        served.cache_clear()


def server_id_of(path: str) -> uuid.UUID:
    """The server a path names; any other path under the gateway's prefix is a JSON 404."""
    match = PATH_RE.match(path)
    try:
        if match:
            return uuid.UUID(match.group(1))
    except ValueError:
        pass
    raise ProxyError(404, -32002, "Unknown MCP server.")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ProxyError(405, -32600, f"Method {method} not allowed.",
                         headers=[(b"allow", ", ".join(METHODS).encode())])


async def authenticate(headers: dict[bytes, bytes]) -> KeyInfo:
    raw_header = headers.get(b"authorization")
    try:
        raw = parse_authorization(raw_header.decode("latin-1") if raw_header else None)
        return await get_key(raw)
    except ApiKeyError as exc:
        raise ProxyError(401, -32001, str(exc), headers=[(b"www-authenticate", b'Bearer realm="twinmcp"')]) from None


async def load_server(call: Call, server_id: uuid.UUID, key: KeyInfo) -> ServerInfo:
    """The server, only if it is the key's workspace's: a foreign id is as unknown as a random one."""
    server = await get_server(server_id, key)
    if server is None or not server.flag_on:
        raise ProxyError(404, -32002, "Unknown MCP server.")
    call.server = server
    if server.disabled:
        raise ProxyError(503, -32003, f"The MCP server {server.name!r} is disabled by a workspace admin.",
                         outcome=Outcome.UPSTREAM_ERROR, error_class="disabled")
    if server.connection_needed:
        raise connection_needed(server, server.connection_needed)
    if server.credential_error:
        raise ProxyError(502, -32004, f"TwinMCP cannot use the stored credentials of {server.name!r}: "
                         f"{server.credential_error}", outcome=Outcome.UPSTREAM_ERROR, error_class="credentials")
    return server


async def read_messages(call: Call, receive: Receive) -> None:
    """The POST body (bounded in size and time) and its JSON-RPC messages, counted for the quota."""
    timeout_s = settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000
    try:
        async with asyncio.timeout(timeout_s):  # no task per request, as wait_for would make
            call.body = await _read_body(receive)
    except TimeoutError:
        raise ProxyError(408, -32600, f"The request body did not arrive within {timeout_s:g} s.") from None
    try:
        call.messages, call.batch = messages_of(call.body)
    except InvalidMessage as exc:
        raise ProxyError(400, -32600, f"Invalid request: {exc}.") from None
    except ValueError as exc:
        raise ProxyError(400, -32700, f"Parse error: the body is {exc}.") from None
    counted_methods = settings.EXTERNAL_MCP_COUNTED_METHODS
    call.counted = sum(1 for m in call.messages if is_request(m) and m["method"] in counted_methods)


async def _read_body(receive: Receive) -> bytes:
    limit = settings.EXTERNAL_MCP_PROXY_MAX_BODY_BYTES
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise client_disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(413, -32600, f"Request body larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def govern(call: Call, server: ServerInfo, headers: dict[bytes, bytes]) -> None:
    """Only approved tools are called, and the routing headers say what the body says."""
    check_routing_headers(call, headers)
    for message in call.messages:
        if message.get("method") != "tools/call":
            continue
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        refusal = tool_refusal(server, name) if isinstance(name, str) else "tools/call without a tool name."
        if refusal:
            raise ProxyError(200, -32602, refusal, outcome=Outcome.BLOCKED,
                             data={"tool": name, "state": server.tool_states.get(name or "", "unknown")})


def check_routing_headers(call: Call, headers: dict[bytes, bytes]) -> None:
    """``Mcp-Method`` and ``Mcp-Name`` must say what the body says (the 2026-07-28 rule,
    HeaderMismatch): an upstream that routes on the headers would otherwise run a tool the
    governance never saw."""
    method_header = headers.get(b"mcp-method")
    name_header = headers.get(b"mcp-name")
    if method_header is None and name_header is None:
        return
    requests = [m for m in call.messages if "method" in m]
    if method_header is not None and any(m["method"] != method_header.decode("latin-1") for m in requests):
        raise ProxyError(400, -32020, "The Mcp-Method header does not match the request body.")
    if name_header is None:
        return
    name = decode_header_value(name_header.decode("latin-1"))
    for message in requests:
        params = message.get("params")
        if message["method"] == "tools/call" and (not isinstance(params, dict) or params.get("name") != name):
            raise ProxyError(400, -32020, "The Mcp-Name header does not match the tool named in the body.")
