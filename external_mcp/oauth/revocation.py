"""Revoking dropped tokens at the authorization server (RFC 7009), from an outbox.

The transaction that drops tokens (disconnect, a new connection, a deleted or changed server)
writes what to revoke, where and as which client, encrypted; a task sends it after the commit
and beat retries what failed with a backoff. So a click never waits on the authorization server,
a server that is down loses nothing, and the row is gone once the server took it (or offers no
revocation). The refresh token goes first: revoking it ends the grant at most servers."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone
from mcp.shared.auth import OAuthClientInformationFull, OAuthMetadata
from pydantic import ValidationError

from external_mcp import crypto, mcp_client
from external_mcp.models import ExternalMcpServer, OAuthRevocation
from external_mcp.oauth import client as oauth
from external_mcp.oauth.authserver import auth_server_of
from external_mcp.queue import queue_revocations

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
BACKOFF_FIRST = timedelta(minutes=1)
BACKOFF_MAX = timedelta(hours=6)
BATCH = 100


def revocation_queue(*, server: ExternalMcpServer, payload: dict[str, Any]) -> OAuthRevocation | None:
    """Inside the transaction that drops ``payload``'s tokens; None when the authorization server
    offers no revocation (or was never found)."""
    place = auth_server_of(server, payload)
    if place is None or place.metadata.revocation_endpoint is None:
        return None
    tokens = [(payload[name], name) for name in ("refresh_token", "access_token") if payload.get(name)]
    if not tokens:
        return None
    row = OAuthRevocation(key_id=crypto.current_key_id())
    row.ciphertext = crypto.encrypt_json({
        "tokens": tokens, "metadata": place.metadata.model_dump(mode="json", exclude_none=True),
        "client": place.client.model_dump(mode="json", exclude_none=True)}, context=row.context)
    row.save()
    transaction.on_commit(lambda: queue_revocations([str(row.pk)]))
    return row


def revocations_send(*, ids: list[str] | None = None, now: datetime | None = None) -> int:
    """Send the due revocations (or those of ``ids``); returns how many are done."""
    now = now or timezone.now()
    due = OAuthRevocation.objects.filter(next_attempt_at__lte=now)
    if ids is not None:
        due = due.filter(pk__in=ids)
    done = 0
    for row in list(due.order_by("next_attempt_at")[:BATCH]):
        if _claim(row, now) and _send(row):
            done += 1
    return done


def _claim(row: OAuthRevocation, now: datetime) -> bool:
    """One sender per row: the claim pushes the next attempt past the backoff before sending."""
    wait = min(BACKOFF_FIRST * 2 ** row.attempts, BACKOFF_MAX)
    return bool(OAuthRevocation.objects.filter(pk=row.pk, attempts=row.attempts).update(
        attempts=row.attempts + 1, next_attempt_at=now + wait))


def _send(row: OAuthRevocation) -> bool:
    try:
        data = crypto.decrypt_json(row.ciphertext, context=row.context)
        metadata = OAuthMetadata.model_validate(data["metadata"])
        client = OAuthClientInformationFull.model_validate(data["client"])
    except (crypto.DecryptionError, ValidationError, KeyError) as exc:
        logger.error("revocation %s cannot be read (%s); dropped", row.pk, type(exc).__name__)
        row.delete()
        return False
    try:
        asyncio.run(_revoke(metadata, client, data["tokens"]))
    except oauth.TokenRefused as exc:
        if row.attempts + 1 >= MAX_ATTEMPTS or exc.permanent:
            logger.warning("revocation %s given up after %s attempts: %s", row.pk, row.attempts + 1, exc)
            row.delete()
            return False
        OAuthRevocation.objects.filter(pk=row.pk).update(last_error=str(exc)[:2000])
        return False
    row.delete()
    return True


async def _revoke(metadata: OAuthMetadata, client: OAuthClientInformationFull, tokens: list[list[str]]) -> None:
    async with mcp_client.new_session(limit=2) as session:
        for token, hint in tokens:
            await oauth.revoke(session, metadata, client, token=token, hint=hint)
