"""Telling every gateway process to forget what it cached about keys, servers and tools.

The proxy keeps access decisions in process memory (``external_mcp.proxy_cache``) so the hot
path makes no database query. A revoked key, a disabled server or a quarantined tool must stop
working at once, not after ``EXTERNAL_MCP_PROXY_CACHE_SECONDS``: the service that makes such a
change calls ``announce_change()``; once its transaction commits, this process flushes its
caches and publishes on a Redis channel that every gateway process listens to (``listen``).
Writes like these are rare admin actions, so a flush of everything is cheap: each entry reloads
once, on its next use. Without Redis (the embedded ``make run``), or for changes made around
the services (Django admin, SQL), the TTL still bounds staleness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis
import redis.asyncio
from django.conf import settings
from django.db import transaction

logger = logging.getLogger("twinmcp.invalidation")

CHANNEL = "twinmcp:proxy-cache:flush"
RECONNECT_SECONDS = 1.0

_flushers: list[Callable[[], None]] = []
_generation = [0]
_publisher: dict[str, redis.Redis] = {}


def on_flush(flusher: Callable[[], None]) -> None:
    """Register a cache's ``clear``; called for every flush of this process."""
    _flushers.append(flusher)


def generation() -> int:
    """Increases with every flush: a load that started before one must not be cached after it."""
    return _generation[0]


def flush_local() -> None:
    _generation[0] += 1
    for flusher in _flushers:
        flusher()


def announce_change() -> None:
    """Call inside the transaction that changes an access decision; acts after it commits."""
    transaction.on_commit(_broadcast)


def _broadcast() -> None:
    flush_local()
    url = settings.REDIS_URL
    if not url:
        return
    try:
        client = _publisher.get(url)
        if client is None:
            client = _publisher[url] = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        client.publish(CHANNEL, b"flush")
    except (redis.RedisError, OSError) as exc:
        logger.warning("could not tell the gateway processes to flush their caches (%s); they will "
                       "notice within EXTERNAL_MCP_PROXY_CACHE_SECONDS", exc)


async def listen() -> None:
    """Run for the life of a gateway process: flush on every message. A lost connection also
    flushes (a message may have been missed) before reconnecting."""
    url = settings.REDIS_URL
    if not url:
        return
    while True:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30,
                                              health_check_interval=10)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                flush_local()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        flush_local()
        except (redis.RedisError, OSError) as exc:
            logger.warning("cache invalidation channel lost (%s); reconnecting", exc)
        finally:
            await client.aclose()
        flush_local()
        await asyncio.sleep(RECONNECT_SECONDS)
