"""Where an upstream's tokens come from: the MCP server's 401 names its protected-resource metadata
(RFC 9728), that names the authorization server, whose metadata (RFC 8414, else OpenID discovery)
names the endpoints. Every document is hostile input: fetched without redirects, bounded in size,
validated by the SDK's models, and checked against what pointed at it (the resource against the
server's URL, RFC 8707; the issuer against the URL it was found from, RFC 8414 §3.3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx2
from mcp.client.auth.utils import (
    build_oauth_authorization_server_metadata_discovery_urls,
    build_protected_resource_metadata_discovery_urls,
    extract_resource_metadata_from_www_auth,
    extract_scope_from_www_auth,
    get_client_metadata_scopes,
    issuers_match,
)
from mcp.shared.auth import OAuthMetadata, ProtectedResourceMetadata
from mcp.shared.auth_utils import check_resource_allowed, resource_url_from_server_url
from pydantic import BaseModel, ValidationError

from external_mcp import urlpolicy
from external_mcp.oauth import read_capped

Model = TypeVar("Model", bound=BaseModel)
MAX_DOCUMENT_BYTES = 64 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)
PROBE = {"jsonrpc": "2.0", "id": "twinmcp-oauth-probe", "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "twinmcp", "version": "1.0"}}}


class DiscoveryError(Exception):
    """Why an upstream's authorization server could not be found; the message is for an admin."""


@dataclass(frozen=True)
class Discovered:
    resource: str
    """The value of the ``resource`` parameter on authorize and token requests (RFC 8707)."""
    issuer: str
    metadata: OAuthMetadata
    scope: str | None
    """The scope to ask for: the server's challenge, else what its metadata lists."""


async def discover(session: aiohttp.ClientSession, server_url: str) -> Discovered:
    """The authorization server of the MCP server at ``server_url``, from an unauthenticated probe."""
    challenge = await _challenge(session, server_url)
    metadata_url = extract_resource_metadata_from_www_auth(challenge)
    found = await _first(session, build_protected_resource_metadata_discovery_urls(metadata_url, server_url),
                         ProtectedResourceMetadata, "protected-resource metadata (RFC 9728)")
    if found is None:
        # A 2025-03-26 server publishes no RFC 9728 document: its own origin is its authorization server.
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(server_url))
        metadata = await _server_metadata(session, None, server_url, expected=origin)
        return Discovered(resource=resource_url_from_server_url(server_url), issuer=str(metadata.issuer),
                          metadata=metadata, scope=get_client_metadata_scopes(
                              extract_scope_from_www_auth(challenge), None, metadata,
                              ["authorization_code", "refresh_token"]))
    resource_metadata = found[1]
    resource = str(resource_metadata.resource)
    if not check_resource_allowed(resource_url_from_server_url(server_url), resource):
        raise DiscoveryError(f"The server's metadata names the resource {resource}, which is not the server's URL "
                             f"{server_url}: refused, its tokens could be meant for another server.")
    issuer = str(resource_metadata.authorization_servers[0])
    metadata = await _server_metadata(session, issuer, server_url, expected=issuer)
    scope = get_client_metadata_scopes(extract_scope_from_www_auth(challenge), resource_metadata, metadata,
                                       ["authorization_code", "refresh_token"])
    return Discovered(resource=resource, issuer=issuer, metadata=metadata, scope=scope)


async def _challenge(session: aiohttp.ClientSession, server_url: str) -> httpx2.Response:
    """The server's answer to a request without a token, as the SDK's helpers read it."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    try:
        async with session.post(server_url, data=json.dumps(PROBE), headers=headers, allow_redirects=False,
                                timeout=TIMEOUT) as response:
            status, www_authenticate = response.status, response.headers.get("WWW-Authenticate", "")
    except urlpolicy.UrlPolicyError as exc:
        raise DiscoveryError(f"The server's address is refused by the URL policy ({exc}).") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DiscoveryError(f"The server could not be reached ({type(exc).__name__}).") from None
    if status != 401:
        raise DiscoveryError(f"The server answered HTTP {status} without a token: it does not ask for OAuth.")
    return httpx2.Response(401, headers={"WWW-Authenticate": www_authenticate[:4096]})


async def _server_metadata(session: aiohttp.ClientSession, issuer: str | None, server_url: str, *,
                           expected: str) -> OAuthMetadata:
    found = await _first(session, build_oauth_authorization_server_metadata_discovery_urls(issuer, server_url),
                         OAuthMetadata, "authorization-server metadata (RFC 8414)")
    if found is None:
        raise DiscoveryError(f"The authorization server {expected} publishes no metadata (RFC 8414 or OpenID "
                             "discovery).")
    url, metadata = found
    if not issuers_match(str(metadata.issuer), expected):
        raise DiscoveryError(f"The authorization-server metadata at {url} names the issuer {metadata.issuer}, "
                             f"not {expected}: refused (RFC 8414 §3.3).")
    return metadata


async def _first(session: aiohttp.ClientSession, urls: list[str], model: type[Model],
                 what: str) -> tuple[str, Model] | None:
    """The first document served at ``urls``, validated; None when none is."""
    for url in urls:
        document = await _document(session, url)
        if document is None:
            continue
        try:
            return url, model.model_validate_json(document)
        except ValidationError:
            raise DiscoveryError(f"The {what} at {url} is not valid.") from None
    return None


async def _document(session: aiohttp.ClientSession, url: str) -> bytes | None:
    """A metadata document, or None where none is served (any status but 200, redirects included)."""
    try:
        urlpolicy.validate_url(url, resolve=False)  # its scheme and literal address; the resolver checks the rest
        async with session.get(url, headers={"Accept": "application/json"}, allow_redirects=False,
                               timeout=TIMEOUT) as response:
            if response.status != 200:
                return None
            body = await read_capped(response, MAX_DOCUMENT_BYTES)
    except urlpolicy.UrlPolicyError as exc:
        raise DiscoveryError(f"{url} is refused by the URL policy ({exc}).") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DiscoveryError(f"{url} could not be fetched ({type(exc).__name__}).") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise DiscoveryError(f"The document at {url} is larger than {MAX_DOCUMENT_BYTES // 1024} KiB.")
    return body
