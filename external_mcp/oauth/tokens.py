"""Access tokens TwinMCP obtains for itself with the client-credentials grant, kept in process
memory per server and credential: a machine's token rotates nothing, so each gateway process may
hold its own, and none is ever stored. One request per process fetches it (the others wait for it),
again before it ends (a minute before, or a tenth of its life for a short one), and at once when
the upstream refuses it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from mcp.shared.auth import OAuthClientInformationFull
from mcp.shared.auth_utils import resource_url_from_server_url

from external_mcp.oauth import client as oauth
from external_mcp.oauth.discovery import DiscoveryError, discover

EARLY_SECONDS = 60

_tokens: dict[str, tuple[str, float | None]] = {}
"""cache key -> (token, when to ask for the next one)."""
_inflight: dict[tuple[int, str], asyncio.Future[tuple[str, float | None]]] = {}


class TokenUnavailable(Exception):
    """No token could be obtained; the message says why, for an admin (it names no secret).
    ``passing``: the authorization server may give one later (it is down or busy)."""

    error_class = "auth"
    """How a health check that needed the token is recorded."""

    def __init__(self, message: str, *, passing: bool = False) -> None:
        super().__init__(message)
        self.passing = passing


async def access_token(payload: dict[str, str], *, base_url: str, cache_key: str, session: aiohttp.ClientSession,
                       refused: str | None = None, fresh: bool = False) -> str:
    """A token for the server at ``base_url``: a new one when ``fresh``, or when the one held is
    ``refused`` (the upstream's 401 to it) or about to end."""
    held = _tokens.get(cache_key)
    if held is not None and not fresh and held[0] != refused and (held[1] is None or held[1] > time.time()):
        return held[0]
    slot = (id(asyncio.get_running_loop()), cache_key)
    pending = _inflight.get(slot)
    if pending is None:
        pending = _inflight[slot] = asyncio.ensure_future(_fetch(payload, base_url, session))
        pending.add_done_callback(lambda _done: _inflight.pop(slot, None))
    _tokens[cache_key] = fetched = await asyncio.shield(pending)
    return fetched[0]


async def _fetch(payload: dict[str, str], base_url: str, session: aiohttp.ClientSession) -> tuple[str, float | None]:
    token_endpoint = payload.get("token_url")
    resource = resource_url_from_server_url(base_url)
    if not token_endpoint:
        try:
            found = await discover(session, base_url)
        except DiscoveryError as exc:
            raise TokenUnavailable(f"TwinMCP cannot find where to ask for a token: {exc}") from None
        token_endpoint, resource = str(found.metadata.token_endpoint), found.resource
    client = OAuthClientInformationFull(client_id=payload["client_id"], client_secret=payload["client_secret"],
                                        redirect_uris=None, token_endpoint_auth_method="client_secret_basic")
    try:
        tokens = await oauth.client_credentials(session, token_endpoint, client, resource=resource,
                                                scope=payload.get("scope") or None)
    except oauth.TokenRefused as exc:
        raise TokenUnavailable(f"The authorization server gave no token: {exc}", passing=not exc.permanent) from None
    if tokens.expires_at is None:
        return tokens.access_token, None
    lifetime = tokens.expires_at - time.time()
    return tokens.access_token, tokens.expires_at - min(EARLY_SECONDS, lifetime / 10)
