"""Access tokens of connected accounts (the authorization-code flow), refreshed once per token
across every gateway process.

A process holds the newest token it has seen per connection. When that token is about to end,
or the upstream refuses it, one coroutine per process renews it (the others wait for it) in a
database transaction that locks the connection's row: a worker that waited on the lock finds a
newer ``version`` and uses the token the first one stored, so an authorization server that
rotates refresh tokens sees one refresh, never two racing with the same refresh token (the
second would be ``invalid_grant``, and kill the grant at servers with reuse protection). The
lock and the write are one transaction: a worker that dies mid-refresh frees the row with its
connection, no lease to size. On SQLite (one process) the lock is a no-op and the single flight
suffices.

A final refusal (``invalid_grant``: the grant was revoked or expired) marks the connection as
needing re-authorization, once, with one notification; calls then get an error saying where to
reconnect, without asking the authorization server again. A refusal that may pass (the server
is down) is recorded and retried by the next call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from external_mcp import crypto, mcp_client
from external_mcp.choices import ConnectionState
from external_mcp.connections import connection_needs_reauth
from external_mcp.models import Connection
from external_mcp.oauth import client as oauth
from external_mcp.oauth.authserver import AuthServer, auth_server_of
from external_mcp.oauth.tokens import TokenUnavailable

EARLY_SECONDS = 60
LOCK_TIMEOUT = "20s"


class ConnectionNeeded(TokenUnavailable):
    """The caller has no usable connection: they (or an admin) must connect an account at ``url``."""

    error_class = "needs_auth"

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class Grant:
    connection_id: Any
    server_id: Any
    server_name: str
    access_token: str
    renew_at: float | None
    """When to renew it (epoch seconds): a minute before it ends, or a tenth of its life for a short one."""
    version: int
    own: bool
    """The caller's own connection (per-user credentials), not the workspace's."""

    def usable(self, now: float) -> bool:
        return self.renew_at is None or self.renew_at > now

    @classmethod
    def of(cls, row: Connection, payload: dict[str, Any]) -> Grant:
        return cls(connection_id=row.pk, server_id=row.server_id, server_name=row.server.name,
                   access_token=payload["access_token"],
                   renew_at=_renew_at(row.expires_at, row.refreshed_at or row.connected_at),
                   version=row.version, own=row.user_id is not None)


def _renew_at(expires_at: datetime | None, since: datetime) -> float | None:
    if expires_at is None:
        return None
    lifetime = max((expires_at - since).total_seconds(), 0.0)
    return expires_at.timestamp() - min(EARLY_SECONDS, lifetime / 10)


_newest: dict[Any, Grant] = {}
_inflight: dict[tuple[int, Any], asyncio.Future[Grant]] = {}


def connect_url(server_id: Any) -> str:
    return f"{settings.TWINMCP_PUBLIC_URL.rstrip('/')}/servers/{server_id}/"


async def access_token(grant: Grant, *, refused: str | None = None) -> str:
    """The connection's access token, renewed when it is about to end or is the one ``refused``."""
    held = _newest.get(grant.connection_id)
    if held is None or held.version <= grant.version:  # the same version freshly read is as new
        held = _newest[grant.connection_id] = grant
    if held.access_token != refused and held.usable(time.time()):
        return held.access_token
    slot = (id(asyncio.get_running_loop()), grant.connection_id)
    pending = _inflight.get(slot)
    if pending is None:
        pending = _inflight[slot] = asyncio.ensure_future(
            sync_to_async(renew, thread_sensitive=False)(held))
        pending.add_done_callback(lambda _done: _inflight.pop(slot, None))
    renewed = await asyncio.shield(pending)
    if renewed.version >= _newest.get(grant.connection_id, renewed).version:
        _newest[grant.connection_id] = renewed
    return renewed.access_token


def renew(seen: Grant) -> Grant:
    """A token newer than ``seen``: the one another process stored meanwhile, or a refreshed one.
    A refusal is committed before it is raised: the row's state is what the next call reads."""
    close_old_connections()
    with transaction.atomic():
        outcome = _renew_locked(seen)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _renew_locked(seen: Grant) -> Grant | TokenUnavailable:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    row = Connection.objects.select_for_update(of=("self",)).select_related("server").filter(
        pk=seen.connection_id).first()
    if row is None:
        return ConnectionNeeded(f"The connection to {seen.server_name} was removed; connect again.",
                                url=connect_url(seen.server_id))
    if row.state != ConnectionState.ACTIVE:
        return _needs_reauth(row)
    payload = crypto.decrypt_json(row.ciphertext, context=row.context)
    if row.version != seen.version:
        return Grant.of(row, payload)
    place = auth_server_of(row.server, payload)
    refresh_token = payload.get("refresh_token")
    if place is None or not refresh_token:
        connection_needs_reauth(connection=row, reason="The access token ended and the authorization server gave no "
                                "refresh token.")
        return _needs_reauth(row)
    try:
        tokens = async_to_sync(_refresh)(place, refresh_token)
    except oauth.TokenRefused as exc:
        if not exc.permanent:
            Connection.objects.filter(pk=row.pk).update(last_error=str(exc)[:2000])
            return TokenUnavailable(str(exc), passing=True)
        connection_needs_reauth(connection=row, reason=str(exc))
        return _needs_reauth(row)
    return Grant.of(connection_tokens_save(row=row, tokens=tokens, previous=payload), _payload(tokens, payload))


async def _refresh(place: AuthServer, refresh_token: str) -> oauth.Tokens:
    async with mcp_client.new_session(limit=2) as session:
        return await oauth.refresh(session, place.metadata, place.client, refresh_token=refresh_token,
                                   resource=place.resource)


def _payload(tokens: oauth.Tokens, previous: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {"access_token": tokens.access_token}
    if tokens.refresh_token:
        payload["refresh_token"] = tokens.refresh_token
    if previous.get("client"):
        payload["client"] = previous["client"]
    return payload


def connection_tokens_save(*, row: Connection, tokens: oauth.Tokens, previous: dict[str, Any]) -> Connection:
    """Store renewed tokens on a locked row, as the next version."""
    payload = _payload(tokens, previous)
    row.ciphertext = crypto.encrypt_json(payload, context=row.context)
    row.key_id = crypto.current_key_id()
    row.fingerprint = crypto.fingerprint(payload)
    row.version += 1
    row.refreshed_at = timezone.now()
    row.expires_at = _aware(tokens.expires_at)
    row.scope = (tokens.scope or row.scope)[:1000]
    row.last_error = ""
    row.save(update_fields=["ciphertext", "key_id", "fingerprint", "version", "refreshed_at", "expires_at", "scope",
                            "last_error"])
    return row


def _aware(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def _needs_reauth(row: Connection) -> ConnectionNeeded:
    return connection_needed(server_id=row.server_id, server_name=row.server.name, own=row.user_id is not None,
                             again=True)


def connection_needed(*, server_id: Any, server_name: str, own: bool, again: bool) -> ConnectionNeeded:
    """What an agent is told when its calls have no connection to use: whose, and where to make it."""
    url = connect_url(server_id)
    if own and again:
        message = f"Your connection to {server_name} needs to be authorized again: reconnect your account at {url}"
    elif own:
        message = f"{server_name} needs your own account: connect it at {url} (per-user credentials), then call again."
    elif again:
        message = (f"The connection of {server_name} needs to be authorized again: a workspace admin must reconnect "
                   f"it at {url}")
    else:
        message = f"{server_name} is not connected yet: a workspace admin must connect its account at {url}"
    return ConnectionNeeded(message, url=url)
