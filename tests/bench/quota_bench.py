"""`make bench` (quota part): what one quota decision costs, beside its floor, in the same run.

On the private Redis of `.ci/with-services.sh`, from one asyncio client, at C = 1 and C = 16:
a PING round trip (the floor), the quota script the limiter used before tickets and epochs
(INCRBY + TTL/EXPIRE, for comparison), today's script (``CONSUME_SCRIPT``), and the whole
``UsageLimiter.aconsume`` (the Python around it). Rounds alternate so a drifting machine
weighs on every row alike.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

PREVIOUS_SCRIPT = """
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local used = redis.call('INCRBY', KEYS[1], amount)
if redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if limit >= 0 and used > limit then
  redis.call('DECRBY', KEYS[1], amount)
  return {0, used - amount}
end
return {1, used}
"""


async def measure(call: Callable[[], Awaitable[object]], concurrency: int, total: int) -> tuple[float, float]:
    """(p50 µs per call, calls/s) for ``total`` calls from ``concurrency`` tasks."""
    latencies: list[float] = []
    pending = iter(range(total))

    async def worker() -> None:
        for _ in pending:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1e6)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statistics.median(latencies), total / (time.perf_counter() - started)


async def run() -> None:
    import redis.asyncio

    from usage.limiter import UsageLimiter
    from usage.quota_redis import CONSUME_SCRIPT, EPOCH_KEY, quota_key

    url = os.environ["REDIS_URL"]
    client = redis.asyncio.Redis.from_url(url)
    await client.set(EPOCH_KEY, 0, nx=True)
    previous = client.register_script(PREVIOUS_SCRIPT)
    current = client.register_script(CONSUME_SCRIPT)
    limiter = UsageLimiter(url)
    today = datetime.now(UTC).date()
    big = 10**12

    async def ping() -> object:
        return await client.ping()

    async def old() -> object:
        return await previous(keys=[f"twinmcp:bench:old:{today}"], args=[1, big, 90000])

    async def new() -> object:
        keys = [quota_key(987654321, today), EPOCH_KEY, f"twinmcp:quota-ticket:{uuid.uuid4().hex}"]
        return await current(keys=keys, args=[1, big, 90000, "0", 95])

    async def whole() -> object:
        return await limiter.aconsume(987654322, big)

    rows = {"PING (floor)": ping, "previous script": old, "CONSUME_SCRIPT": new, "UsageLimiter.aconsume": whole}
    for call in rows.values():
        await measure(call, 4, 400)  # warm-up: connections, script load, the seed query
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(5):
        for level in (1, 16):
            for name, call in rows.items():
                results.setdefault((name, level), []).append(await measure(call, level, 2000))
    print(f"\n{'C':>3} {'what':<24} {'p50 µs':>8} {'calls/s':>9}   (median of 5 rounds; range of p50)")
    for level in (1, 16):
        for name in rows:
            runs = results[(name, level)]
            p50s = sorted(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            print(f"{level:>3} {name:<24} {statistics.median(p50s):>8.0f} {rate:>9.0f}   "
                  f"({p50s[0]:.0f}–{p50s[-1]:.0f})")
    await limiter.aclose()
    limiter.close()
    await client.aclose()


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    asyncio.run(run())


if __name__ == "__main__":
    main()
