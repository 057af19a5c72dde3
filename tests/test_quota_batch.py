"""Quota scripts of concurrent requests sent to Redis as one pipeline (``usage/quota_batch.py``):
each still decided on its own, a forgotten script reloaded, a failure given to every caller."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio

from usage.quota_batch import ScriptBatcher

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def queued(batcher: ScriptBatcher, script, n: int) -> list:
    """``n`` calls that find a call in flight (``busy``), so they wait and leave together."""
    batcher.busy = True
    calls = [asyncio.ensure_future(batcher.run(script, ["batch:counter"], [1])) for _ in range(n)]
    await asyncio.sleep(0)  # every call is queued
    assert len(batcher.pending) == n
    batcher._next()
    return await asyncio.gather(*calls, return_exceptions=True)


def test_queued_calls_leave_in_one_pipeline_and_each_gets_its_own_answer(redis_url):
    redis.Redis.from_url(redis_url).delete("batch:counter")

    async def scenario():
        client = redis.asyncio.Redis.from_url(redis_url)
        batcher = ScriptBatcher(client)
        script = client.register_script(INCR)
        first = await batcher.run(script, ["batch:counter"], [1])  # nothing in flight: sent alone
        results = await queued(batcher, script, 20)
        await client.aclose()
        return first, results, batcher

    first, results, batcher = asyncio.run(scenario())
    assert first == 1 and sorted(results) == list(range(2, 22))
    assert batcher.largest == 20 and not batcher.busy and not batcher.pending


def test_a_script_redis_forgot_is_loaded_again_for_calls_in_a_pipeline(redis_url):
    sync = redis.Redis.from_url(redis_url)
    sync.delete("batch:counter")

    async def scenario():
        client = redis.asyncio.Redis.from_url(redis_url)
        batcher = ScriptBatcher(client)
        script = client.register_script(INCR)
        await batcher.run(script, ["batch:counter"], [1])
        sync.script_flush()  # what a Redis restart does
        results = await queued(batcher, script, 10)
        await client.aclose()
        return results

    assert sorted(asyncio.run(scenario())) == list(range(2, 12))


def test_a_redis_that_does_not_answer_fails_every_queued_call_and_leaves_the_batcher_usable():
    async def scenario():
        client = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=2)
        batcher = ScriptBatcher(client)
        script = client.register_script(INCR)
        results = await queued(batcher, script, 5)
        await client.aclose()
        return results, batcher

    results, batcher = asyncio.run(scenario())
    assert len(results) == 5 and all(isinstance(r, redis.exceptions.ConnectionError) for r in results)
    assert not batcher.busy and not batcher.pending
