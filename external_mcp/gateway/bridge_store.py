"""Where the HTTP+SSE bridge keeps its sessions and passes messages between gateway workers.

One worker (the session's owner) holds the upstream's event stream; an agent's requests may land
on any worker, which posts them to the upstream itself and waits in a mailbox ("box") for what
the owner reads back from the stream. With Redis every worker shares the records and boxes; without
it (the embedded ``make run``: one process) they live in process memory, with the same semantics.

Per session: the record (server, key, the upstream's message endpoint, the agent's capabilities),
an ``alive`` mark the owner renews while it holds the stream, and the routing of the requests in
flight: request id → box, progress token → box, and the boxes in arrival order (a notification
that names no request goes to the oldest). Open streams are counted per server and workspace by
the owners' heartbeats, so a worker that died stops counting within ``ALIVE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

from django.conf import settings

from external_mcp.gateway.sessions import PerLoopRedis

PREFIX = "twinmcp:sse-bridge:"
ALIVE_SECONDS = 15
"""An owner renews its mark every ``BEAT_SECONDS``; a mark this old means the owner is gone."""
BEAT_SECONDS = 5
BOX_SECONDS = 600
TAKE_SECONDS = 2.0
"""How long a box is waited on at a time: then the waiter checks that the session's owner lives."""
BOX_CAP = 1000
"""Messages a box holds unread (the agent's listening stream may never be opened)."""
GONE = b""
"""Put in a box when the session's stream ended: whoever waits there stops waiting."""


def listening_box(sid: str) -> str:
    """Where requests and notifications for no request in flight wait for the agent's GET stream."""
    return f"{sid}:get"


def _idle() -> int:
    return settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS


class RedisBridgeStore(PerLoopRedis):
    socket_timeout = TAKE_SECONDS + 3
    """Above a box's BLPOP timeout, which blocks by design; a Redis that stops answering is still caught."""

    async def create(self, sid: str, record: dict[str, str]) -> None:
        pipe = self._client().pipeline(transaction=True)
        pipe.hset(PREFIX + sid, mapping=record).expire(PREFIX + sid, _idle())
        pipe.set(f"{PREFIX}{sid}:alive", 1, ex=ALIVE_SECONDS)
        await self._run(pipe.execute())

    async def load(self, sid: str) -> dict[str, str] | None:
        """The record, its idle expiry renewed; None when it ended, expired or lost its owner."""
        pipe = self._client().pipeline(transaction=False)
        pipe.hgetall(PREFIX + sid).expire(PREFIX + sid, _idle()).exists(f"{PREFIX}{sid}:alive")
        fields, _, alive = await self._run(pipe.execute())
        if not fields or not alive:
            return None
        return {k.decode(): v.decode() for k, v in fields.items()}

    async def end(self, sid: str) -> None:
        keys = [PREFIX + sid, f"{PREFIX}{sid}:alive", f"{PREFIX}{sid}:wait", f"{PREFIX}{sid}:tok",
                f"{PREFIX}{sid}:order"]
        await self._run(self._client().delete(*keys))

    async def beat(self, sid: str, scopes: list[str]) -> bool:
        """The owner still holds the stream; False once the session ended (DELETE, idle expiry)."""
        now = time.time()
        pipe = self._client().pipeline(transaction=False)
        pipe.exists(PREFIX + sid).set(f"{PREFIX}{sid}:alive", 1, ex=ALIVE_SECONDS)
        for scope in scopes:
            pipe.zadd(PREFIX + scope, {sid: now}).zremrangebyscore(PREFIX + scope, 0, now - ALIVE_SECONDS)
            pipe.expire(PREFIX + scope, ALIVE_SECONDS * 2)
        results = await self._run(pipe.execute())
        return bool(results[0])

    async def alive(self, sid: str) -> bool:
        return bool(await self._run(self._client().exists(f"{PREFIX}{sid}:alive")))

    async def open_count(self, scope: str) -> int:
        return int(await self._run(self._client().zcount(PREFIX + scope, time.time() - ALIVE_SECONDS, "+inf")))

    async def closed(self, sid: str, scopes: list[str]) -> None:
        pipe = self._client().pipeline(transaction=False)
        for scope in scopes:
            pipe.zrem(PREFIX + scope, sid)
        pipe.delete(f"{PREFIX}{sid}:alive")
        await self._run(pipe.execute())

    async def expect(self, sid: str, box: str, ids: list[str], tokens: list[str]) -> None:
        pipe = self._client().pipeline(transaction=True)
        if ids:
            pipe.hset(f"{PREFIX}{sid}:wait", mapping=dict.fromkeys(ids, box))
        if tokens:
            pipe.hset(f"{PREFIX}{sid}:tok", mapping=dict.fromkeys(tokens, box))
        pipe.zadd(f"{PREFIX}{sid}:order", {box: time.time()})
        for name in ("wait", "tok", "order"):
            pipe.expire(f"{PREFIX}{sid}:{name}", _idle())
        await self._run(pipe.execute())

    async def settle(self, sid: str, box: str, ids: list[str], tokens: list[str]) -> None:
        pipe = self._client().pipeline(transaction=False)
        if ids:
            pipe.hdel(f"{PREFIX}{sid}:wait", *ids)
        if tokens:
            pipe.hdel(f"{PREFIX}{sid}:tok", *tokens)
        pipe.zrem(f"{PREFIX}{sid}:order", box).delete(PREFIX + "box:" + box)
        await self._run(pipe.execute())

    async def box_of(self, sid: str, *, request: str | None = None, token: str | None = None) -> str | None:
        """Where a message from the stream goes: its request's box, its progress token's, or the
        oldest request in flight's; None when nobody waits."""
        client = self._client()
        found = None
        if request is not None:
            found = await self._run(client.hget(f"{PREFIX}{sid}:wait", request))
        elif token is not None:
            found = await self._run(client.hget(f"{PREFIX}{sid}:tok", token))
        if found is None and request is None:
            oldest = await self._run(client.zrange(f"{PREFIX}{sid}:order", 0, 0))
            found = oldest[0] if oldest else None
        return found.decode() if isinstance(found, bytes) else found

    async def boxes(self, sid: str) -> list[str]:
        return [b.decode() for b in await self._run(self._client().zrange(f"{PREFIX}{sid}:order", 0, -1))]

    async def deliver(self, box: str, data: bytes) -> None:
        pipe = self._client().pipeline(transaction=False)
        pipe.rpush(PREFIX + "box:" + box, data).ltrim(PREFIX + "box:" + box, 0, BOX_CAP - 1)
        pipe.expire(PREFIX + "box:" + box, BOX_SECONDS)
        await self._run(pipe.execute())

    async def take(self, box: str, timeout: float) -> bytes | None:
        found = await self._run(self._client().blpop([PREFIX + "box:" + box], timeout=timeout))
        return found[1] if found else None


class MemoryBridgeStore:
    """The same, in one process's memory (no Redis)."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[float, dict[str, str]]] = {}
        self.alive_until: dict[str, float] = {}
        self.waiting: dict[str, dict[str, str]] = defaultdict(dict)
        self.tokens: dict[str, dict[str, str]] = defaultdict(dict)
        self.order: dict[str, dict[str, float]] = defaultdict(dict)
        self.scopes: dict[str, dict[str, float]] = defaultdict(dict)
        self.queues: dict[str, asyncio.Queue[bytes]] = defaultdict(lambda: asyncio.Queue(BOX_CAP))
        self.live: set[str] = set()
        """The boxes somebody may still read: a message for any other is dropped, as Redis expires it."""

    async def create(self, sid: str, record: dict[str, str]) -> None:
        self.records[sid] = (time.monotonic(), dict(record))
        self.alive_until[sid] = time.monotonic() + ALIVE_SECONDS
        self.live.add(listening_box(sid))

    async def load(self, sid: str) -> dict[str, str] | None:
        entry = self.records.get(sid)
        now = time.monotonic()
        if entry is None or entry[0] + _idle() < now or self.alive_until.get(sid, 0) < now:
            return None
        self.records[sid] = (now, entry[1])
        return dict(entry[1])

    async def end(self, sid: str) -> None:
        for table in (self.records, self.alive_until, self.waiting, self.tokens, self.order):
            table.pop(sid, None)
        self.live.discard(listening_box(sid))
        self.queues.pop(listening_box(sid), None)

    async def beat(self, sid: str, scopes: list[str]) -> bool:
        now = time.monotonic()
        entry = self.records.get(sid)
        if entry is None or entry[0] + _idle() < now:
            return False
        self.alive_until[sid] = now + ALIVE_SECONDS
        for scope in scopes:
            self.scopes[scope][sid] = now
        return True

    async def alive(self, sid: str) -> bool:
        return self.alive_until.get(sid, 0) >= time.monotonic()

    async def open_count(self, scope: str) -> int:
        cutoff = time.monotonic() - ALIVE_SECONDS
        return sum(1 for seen in self.scopes[scope].values() if seen >= cutoff)

    async def closed(self, sid: str, scopes: list[str]) -> None:
        for scope in scopes:
            self.scopes[scope].pop(sid, None)
        self.alive_until.pop(sid, None)

    async def expect(self, sid: str, box: str, ids: list[str], tokens: list[str]) -> None:
        self.waiting[sid].update(dict.fromkeys(ids, box))
        self.tokens[sid].update(dict.fromkeys(tokens, box))
        self.order[sid][box] = time.monotonic()
        self.live.add(box)

    async def settle(self, sid: str, box: str, ids: list[str], tokens: list[str]) -> None:
        for name in ids:
            self.waiting.get(sid, {}).pop(name, None)
        for name in tokens:
            self.tokens.get(sid, {}).pop(name, None)
        self.order.get(sid, {}).pop(box, None)
        self.queues.pop(box, None)
        self.live.discard(box)

    async def box_of(self, sid: str, *, request: str | None = None, token: str | None = None) -> str | None:
        if request is not None:
            return self.waiting.get(sid, {}).get(request)
        found = self.tokens.get(sid, {}).get(token) if token is not None else None
        order = self.order.get(sid)
        if found is None and order:
            found = min(order.items(), key=lambda item: item[1])[0]
        return found

    async def boxes(self, sid: str) -> list[str]:
        return list(self.order.get(sid, {}))

    async def deliver(self, box: str, data: bytes) -> None:
        if box in self.live:
            with contextlib.suppress(asyncio.QueueFull):  # nobody reads it: the oldest unread stay
                self.queues[box].put_nowait(data)

    async def take(self, box: str, timeout: float) -> bytes | None:
        try:
            async with asyncio.timeout(timeout):
                return await self.queues[box].get()
        except TimeoutError:
            return None


_stores: dict[str, RedisBridgeStore | MemoryBridgeStore] = {}


def store() -> RedisBridgeStore | MemoryBridgeStore:
    url = settings.REDIS_URL
    found = _stores.get(url)
    if found is None:
        found = _stores[url] = RedisBridgeStore(url) if url else MemoryBridgeStore()
    return found
