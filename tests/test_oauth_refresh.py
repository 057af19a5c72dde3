"""Refresh that does not fail silently: an access token is renewed before it ends and when the
upstream refuses it, once per token across every gateway process (a rotating refresh token used
twice would kill the grant), and an authorization server that is down is a retryable error, not
a lost connection. Real authorization server, real gateway processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection as db
from django.utils import timezone

from external_mcp import crypto
from external_mcp.choices import ConnectionState
from external_mcp.models import Connection
from external_mcp.oauth import grants
from tests.gateway import GatewayProcess
from tests.oauth_peers import oauth_peer
from tests.test_oauth_connect import approve, call, connected, refusal

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]


def grant_of(row: Connection) -> grants.Grant:
    return grants.Grant.of(row, crypto.decrypt_json(row.ciphertext, context=row.context))


def renew_in_thread(grant: grants.Grant) -> grants.Grant:
    """A worker's renewal, on its own database connection (as another process would have)."""
    try:
        return grants.renew(grant)
    finally:
        db.close()


def waiting_on_a_lock() -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database()")
        return cursor.fetchone()[0]


def test_a_worker_that_waited_for_the_lock_uses_the_token_the_first_one_obtained(admin):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        seen = grant_of(Connection.objects.get(server=server))
        gate = peer.hold_refreshes()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(renew_in_thread, seen)
            assert peer.arrived()  # the first holds the row and waits for the authorization server
            second = pool.submit(renew_in_thread, seen)
            deadline = time.monotonic() + 30
            while not waiting_on_a_lock():  # the second waits for the row: it cannot refresh meanwhile
                assert time.monotonic() < deadline and not second.done(), "the second worker did not wait"
                time.sleep(0.02)
            gate.set()
            renewed, reused = first.result(), second.result()
        refreshes = peer.token_requests["refresh_token"]
    assert refreshes == 1
    assert renewed.version == reused.version == seen.version + 1
    assert renewed.access_token == reused.access_token != seen.access_token


def test_two_gateway_processes_refresh_an_expired_token_once(admin, member, redis_url):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        server = approve(admin, server)
        with GatewayProcess(redis_url=redis_url, workers=2) as gateway:
            peer.expire_access_tokens()

            async def burst() -> list[str]:
                return await asyncio.gather(*(call(gateway, server, key, "echo", {"text": str(n)})
                                              for n, key in enumerate([admin.raw_key, member.raw_key] * 4)))

            answers = asyncio.run(burst())
        grants_seen = dict(peer.token_requests)
    assert answers == [str(n) for n in range(8)]
    assert grants_seen == {"authorization_code": 1, "refresh_token": 1}
    row = Connection.objects.get(server=server)
    assert row.version == 2 and row.state == ConnectionState.ACTIVE


def test_a_token_about_to_end_is_renewed_before_it_is_sent(admin, gateway):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        server = approve(admin, server)
        now = timezone.now()  # an hour-long token with 30 s left: renewed a minute before it ends
        Connection.objects.filter(server=server).update(connected_at=now - timedelta(minutes=59, seconds=30),
                                                        expires_at=now + timedelta(seconds=30))
        seen = len(peer.requests)  # Connect's discovery probe was refused (no token): that was before
        answer = asyncio.run(call(gateway, server, admin.raw_key, "echo", {"text": "early"}))
        refused = [r for r in peer.requests[seen:] if r.path == "/mcp" and r.status == 401]
        grants_seen = dict(peer.token_requests)
    assert answer == "early" and not refused
    assert grants_seen == {"authorization_code": 1, "refresh_token": 1}


def test_an_authorization_server_that_is_down_is_a_retryable_error_not_a_lost_connection(admin, gateway):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        server = approve(admin, server)
        peer.expire_access_tokens()
        peer.token_endpoint.refresh_status = 503
        down = refusal(gateway, server, admin.raw_key)
        row = Connection.objects.get(server=server)
        peer.token_endpoint.refresh_status = None
        back = asyncio.run(call(gateway, server, admin.raw_key, "echo", {"text": "back"}))
    assert down.code == -32025 and "HTTP 503" in down.message
    assert row.state == ConnectionState.ACTIVE and "HTTP 503" in row.last_error
    assert back == "back"
    assert Connection.objects.get(server=server).last_error == ""
