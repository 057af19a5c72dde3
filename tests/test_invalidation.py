"""The proxy cache forgets what a flush says, even a load that was in flight during it, and
an unreachable Redis never breaks the write that announces a change."""

from __future__ import annotations

import asyncio
import logging

import pytest

from external_mcp import proxy_cache
from twinmcp import invalidation


def test_a_load_that_overlaps_a_flush_is_not_cached(settings):
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 300
    cache = proxy_cache.TTLCache()
    invalidation.on_flush(cache.clear)

    async def load_during_a_flush() -> str:
        invalidation.flush_local()
        return "stale"

    async def fresh() -> str:
        return "fresh"

    async def scenario() -> tuple[str, str]:
        first = await proxy_cache.single_flight(cache, "k", load_during_a_flush)
        return first, await proxy_cache.single_flight(cache, "k", fresh)

    assert asyncio.run(scenario()) == ("stale", "fresh")
    assert cache.get("k") == "fresh"
    invalidation.flush_local()
    assert cache.get("k") is None


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_redis_is_logged_not_raised(settings, caplog):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    before = invalidation.generation()
    with caplog.at_level(logging.WARNING, logger="twinmcp.invalidation"):
        invalidation.announce_change()  # autocommit: runs at once
    assert invalidation.generation() == before + 1
    assert "could not tell the gateway processes" in caplog.text
