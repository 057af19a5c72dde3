"""Agent sessions of the aggregate endpoints, and the upstream sessions TwinMCP keeps for them.

An agent of the handshake era gets TwinMCP's own ``Mcp-Session-Id``; the servers behind the
endpoint never see it. For each server a call reaches, TwinMCP opens that server's session itself,
lazily, and keeps its id in the agent session's record. The record lives in Redis, so any gateway
worker serves any request of a session; without Redis (the embedded ``make run``, one process) it
lives in process memory. A session id is signed with the key and endpoint it was issued for, so
one agent cannot use another's, even while Redis is unreachable: then a request still goes
through, on a fresh upstream session. Agents of the 2026-07-28 era have no session: their
upstream sessions (for servers that still need one) are kept per API key.

A session that stays idle ``EXTERNAL_MCP_SESSION_IDLE_SECONDS`` is ended by ``sweep``, which every
gateway process runs; ending one closes its upstream sessions (DELETE), once, whichever process
claims it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
from django.conf import settings

from usage.quota_redis import REDIS_ERRORS

logger = logging.getLogger("external_mcp.proxy")

RECORD = "twinmcp:mcp-session:"
IDLE_INDEX = "twinmcp:mcp-sessions"
_SWEEP_BATCH = 100
# The record outlives its idle limit by this much, so the sweeper still finds what to close.
_GRACE_SECONDS = 600
T = TypeVar("T")


class StoreDown(Exception):
    """A session store (this module's, or the HTTP+SSE bridge's) cannot be reached. Here the request
    goes on without stored upstream sessions; a bridged request cannot be served."""


@dataclass(frozen=True)
class Upstream:
    session_id: str
    """Empty when the server gave none (it keeps no session state)."""
    version: str


@dataclass
class Record:
    version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    owner: dict[str, Any] = field(default_factory=dict)
    """The key's user and workspace: what closing its upstream sessions needs."""
    upstreams: dict[str, Upstream] = field(default_factory=dict)


def issue(key_id: Any, endpoint: str) -> str:
    token = secrets.token_urlsafe(24)
    return f"{token}.{_signature(token, key_id, endpoint)}"


def signed_for(session_id: str, key_id: Any, endpoint: str) -> bool:
    token, dot, signature = session_id.partition(".")
    return bool(dot) and hmac.compare_digest(signature, _signature(token, key_id, endpoint))


def key_scope(key_id: Any) -> str:
    """Where the upstream sessions of a key's sessionless (2026-07-28) requests are kept."""
    return f"key:{key_id}"


def _signature(token: str, key_id: Any, endpoint: str) -> str:
    message = f"{token}|{key_id}|{endpoint}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()[:32]


def _encode(record: Record) -> dict[str, str]:
    fields = {"_v": record.version, "_c": json.dumps(record.capabilities), "_o": json.dumps(record.owner)}
    fields.update({f"u:{server}": json.dumps([u.session_id, u.version]) for server, u in record.upstreams.items()})
    return fields


def _decode(fields: dict[Any, Any]) -> Record:
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
    record = Record(version=text.get("_v", ""))
    try:
        record.capabilities = json.loads(text.get("_c", "{}"))
        record.owner = json.loads(text.get("_o", "{}"))
        for name, value in text.items():
            if name.startswith("u:"):
                session_id, version = json.loads(value)
                record.upstreams[name[2:]] = Upstream(str(session_id), str(version))
    except (ValueError, TypeError):
        logger.warning("an agent session record could not be read; its upstream sessions are reopened")
    return record


class PerLoopRedis:
    """One asyncio Redis client per event loop: a client is bound to the loop it was made on."""

    socket_timeout: float = 1

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: dict[int, redis.asyncio.Redis] = {}

    def _client(self) -> redis.asyncio.Redis:
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout, socket_connect_timeout=1)
        return client

    async def _run(self, operation: Awaitable[T]) -> T:
        """``operation``'s result; Redis's failures as ``StoreDown``."""
        try:
            return await operation
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None


class RedisStore(PerLoopRedis):

    @staticmethod
    def _ttl() -> int:
        return settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS + _GRACE_SECONDS

    async def create(self, scope: str, record: Record) -> None:
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.hset(RECORD + scope, mapping=_encode(record)).expire(RECORD + scope, self._ttl())
                await pipe.zadd(IDLE_INDEX, {scope: time.time()}).execute()
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None

    async def load(self, scope: str) -> Record | None:
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.hgetall(RECORD + scope).expire(RECORD + scope, self._ttl())
                fields = (await pipe.zadd(IDLE_INDEX, {scope: time.time()}, xx=True).execute())[0]
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None
        return _decode(fields) if fields else None

    async def keep(self, scope: str, server_id: str, upstream: Upstream, owner: dict[str, Any]) -> None:
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.hset(RECORD + scope, mapping={f"u:{server_id}": json.dumps([upstream.session_id,
                                                                                 upstream.version]),
                                                   "_o": json.dumps(owner)})
                pipe.expire(RECORD + scope, self._ttl())
                await pipe.zadd(IDLE_INDEX, {scope: time.time()}).execute()
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None

    async def end(self, scope: str) -> Record | None:
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.hgetall(RECORD + scope).delete(RECORD + scope)
                fields = (await pipe.zrem(IDLE_INDEX, scope).execute())[0]
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None
        return _decode(fields) if fields else None

    async def idle(self) -> list[str]:
        """Claims idle sessions: each is returned to exactly one caller."""
        client = self._client()
        cutoff = time.time() - settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS
        try:
            candidates = await client.zrangebyscore(IDLE_INDEX, "-inf", cutoff, start=0, num=_SWEEP_BATCH)
            claimed = []
            for scope in candidates:
                if await client.zrem(IDLE_INDEX, scope):
                    claimed.append(scope.decode() if isinstance(scope, bytes) else scope)
        except REDIS_ERRORS as exc:
            raise StoreDown(str(exc)) from None
        return claimed


class MemoryStore:
    """One process's sessions, when there is no Redis."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[float, Record]] = {}

    async def create(self, scope: str, record: Record) -> None:
        self.records[scope] = (time.time(), record)

    async def load(self, scope: str) -> Record | None:
        entry = self.records.get(scope)
        if entry is None:
            return None
        self.records[scope] = (time.time(), entry[1])
        return entry[1]

    async def keep(self, scope: str, server_id: str, upstream: Upstream, owner: dict[str, Any]) -> None:
        record = self.records.get(scope, (0.0, Record()))[1]
        record.upstreams[server_id] = upstream
        record.owner = owner
        self.records[scope] = (time.time(), record)

    async def end(self, scope: str) -> Record | None:
        entry = self.records.pop(scope, None)
        return entry[1] if entry is not None else None

    async def idle(self) -> list[str]:
        cutoff = time.time() - settings.EXTERNAL_MCP_SESSION_IDLE_SECONDS
        return [scope for scope, (used, _) in list(self.records.items()) if used < cutoff]


_stores: dict[str, RedisStore | MemoryStore] = {}


def store() -> RedisStore | MemoryStore:
    url = settings.REDIS_URL
    found = _stores.get(url)
    if found is None:
        found = _stores[url] = RedisStore(url) if url else MemoryStore()
    return found
