from __future__ import annotations

import asyncio

import pytest

from external_mcp import proxy_cache


@pytest.fixture(autouse=True)
def _ttl(settings):
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 30


def test_concurrent_misses_make_one_load_and_errors_reach_every_waiter():
    cache = proxy_cache.TTLCache()
    loads = []

    async def load():
        loads.append(1)
        await asyncio.sleep(0.05)
        return "value"

    async def scenario():
        return await asyncio.gather(*(proxy_cache.single_flight(cache, "k", load) for _ in range(20)))

    assert asyncio.run(scenario()) == ["value"] * 20
    assert len(loads) == 1
    assert cache.get("k") == "value"

    async def failing():
        raise proxy_cache.ApiKeyError("Unknown API key.")

    async def scenario_error():
        return await asyncio.gather(*(proxy_cache.single_flight(cache, "bad", failing) for _ in range(3)),
                                    return_exceptions=True)

    assert all(isinstance(e, proxy_cache.ApiKeyError) for e in asyncio.run(scenario_error()))
    assert cache.get("bad") is None


def test_ttl_zero_disables_caching_and_entries_expire(settings):
    cache = proxy_cache.TTLCache(max_items=2)
    settings.EXTERNAL_MCP_PROXY_CACHE_SECONDS = 0
    cache.set("a", 1, proxy_cache._ttl())
    assert cache.get("a") is None
    cache.set("a", 1, 30)
    cache.set("b", 2, 30)
    cache.set("c", 3, 30)  # over max_items: the cache starts afresh rather than growing
    assert cache.get("a") is None and cache.get("c") == 3
    cache.set("d", 4, -1)
    assert cache.get("d") is None
