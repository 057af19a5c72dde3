"""Durable, cheap usage events: group commit.

Each proxied request hands its event to a per-process writer and waits until the batch that
contains it is committed, then sends its last byte. Events that arrive while a batch commits
form the next batch, so under load one COMMIT serves many requests (design.md §5: 0.13–0.2 ms
instead of 0.25–0.5 ms per single-row commit) while an answered request's event always survives
a crash. On PostgreSQL a dedicated asyncpg connection writes each batch as one
autocommitted multi-row INSERT; elsewhere (the SQLite demo) the ORM's ``bulk_create`` runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from usage.signals import external_mcp_usage_event

logger = logging.getLogger("usage.recorder")

COLUMNS = (
    "created_at", "user_id", "workspace_id", "server_id", "api_key_id", "method", "tool_name", "jsonrpc_id",
    "request_id", "tokens_in", "tokens_out", "bytes_in", "bytes_out", "latency_ms", "upstream_status",
    "jsonrpc_error_code", "outcome", "counted", "endpoint", "toolset_id",
)
MAX_BATCH = 500
LIBPQ_SSL_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl")
"""``DATABASES`` options the event writer's connection honours as Django's does (in its DSN)."""


class PostgresSink:
    """One autocommitted INSERT per batch on a dedicated asyncpg connection: a single round trip that
    is its own transaction. One or two rows go as VALUES; larger batches as one array per column
    through ``unnest``, a constant statement prepared once, where a VALUES list of varying length
    would be parsed anew each time. asyncpg rather than psycopg (which Django uses for everything
    else) because this statement runs for every proxied request: 42-62 µs of CPU per single-row
    insert instead of 104-150 µs on the 2-core machine (docs/benchmarks.md)."""

    SMALL = 2

    def __init__(self) -> None:
        self.conn: Any = None
        insert = f"INSERT INTO external_mcp_usage_logs ({', '.join(COLUMNS)}) "  # noqa: S608 - constant
        width = len(COLUMNS)
        self.values = [insert + "VALUES " + ", ".join(
            "(" + ", ".join(f"${n * width + i + 1}" for i in range(width)) + ")" for n in range(rows))
            for rows in range(self.SMALL + 1)]
        self.insert = insert
        self.unnest = ""

    async def _connect(self) -> Any:
        import asyncpg

        params = connections["default"].get_connection_params()
        query = {k: str(v) for k, v in params.items() if k in LIBPQ_SSL_OPTIONS}
        return await asyncpg.connect(
            dsn=f"postgresql:///{quote(params.get('dbname') or '')}?{urlencode(query)}",
            host=params.get("host") or None, port=params.get("port") or None,
            user=params.get("user") or None, password=params.get("password") or None,
            server_settings=server_settings(params), statement_cache_size=8,
        )

    def statement(self, rows: Sequence[dict[str, Any]]) -> tuple[str, list[Any]]:
        if len(rows) <= self.SMALL:
            return self.values[len(rows)], [r[c] for r in rows for c in COLUMNS]
        if not self.unnest:
            from usage.models import UsageEvent

            fields = {field.column: field for field in UsageEvent._meta.concrete_fields}
            casts = ", ".join(f"${i + 1}::{fields[c].db_type(connections['default'])}[]"
                              for i, c in enumerate(COLUMNS))
            self.unnest = f"{self.insert}SELECT * FROM unnest({casts})"  # noqa: S608 - model types
        return self.unnest, [[r[c] for r in rows] for c in COLUMNS]

    async def write(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.conn is None or self.conn.is_closed():
            self.conn = await self._connect()
        query, args = self.statement(rows)
        try:
            await self.conn.execute(query, *args)
        except Exception:
            conn, self.conn = self.conn, None
            conn.terminate()  # whatever state it is in: the next batch connects again
            raise

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def server_settings(params: dict[str, Any]) -> dict[str, str]:
    """The session settings Django's connection gets from ``DATABASES`` (libpq's ``options``, such as
    ``-c search_path=usage``, and ``application_name``), so the event writer inserts where Django reads."""
    found: dict[str, str] = {}
    if params.get("application_name"):
        found["application_name"] = str(params["application_name"])
    tokens = shlex.split(str(params.get("options") or ""))
    for index, token in enumerate(tokens):
        setting = ""
        if token == "-c" and index + 1 < len(tokens):
            setting = tokens[index + 1]
        elif token.startswith("-c") and len(token) > 2 or token.startswith("--"):
            setting = token[2:]
        name, sep, value = setting.partition("=")
        if sep and name:
            found[name.replace("-", "_")] = value
    return found


class OrmSink:
    async def write(self, rows: Sequence[dict[str, Any]]) -> None:
        await sync_to_async(_bulk_create, thread_sensitive=False)(list(rows))

    async def close(self) -> None:
        return None


def _bulk_create(rows: list[dict[str, Any]]) -> None:
    from usage.models import UsageEvent

    try:
        UsageEvent.objects.bulk_create([UsageEvent(**row) for row in rows])
    finally:
        connections.close_all()


class BatchRecorder:
    """One per event loop. ``record`` returns once the event is committed (or, if the database
    refuses it, logged in full to the ``usage.recorder`` logger so it can be replayed)."""

    def __init__(self, sink: PostgresSink | OrmSink) -> None:
        self.sink = sink
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.writing = False

    async def record(self, row: dict[str, Any]) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((row, future))
        # Not shielded: a cancelled caller cancels only its own future; the row is written with its batch.
        await future

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            rows = [row for row, _ in batch]
            self.writing = True
            try:
                stored = await self._write(rows)
                if stored:
                    external_mcp_usage_event.send_robust(sender=BatchRecorder, events=stored)
            finally:
                self.writing = False
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows stored. A batch refused twice is written row by row, so a row the database
        refuses costs no other request its event; a refused row is logged whole, never lost silently."""
        try:
            await self._write_with_retry(rows)
            return rows
        except Exception:  # noqa: BLE001 - logged below, row by row
            if len(rows) == 1:
                logger.error("usage event not stored: %s", json.dumps(rows[0], default=str), exc_info=True)
                return []
        stored = []
        for row in rows:
            try:
                await self.sink.write([row])
            except Exception:  # noqa: BLE001 - the same
                logger.error("usage event not stored: %s", json.dumps(row, default=str), exc_info=True)
            else:
                stored.append(row)
        return stored

    async def _write_with_retry(self, rows: list[dict[str, Any]]) -> None:
        try:
            await self.sink.write(rows)
        except Exception:  # noqa: BLE001 - one reconnect covers a dropped connection
            logger.warning("usage event batch failed once; retrying", exc_info=True)
            await self.sink.write(rows)

    async def close(self) -> None:
        """Stop after the events already handed over are written (a shutdown loses none)."""
        while not self.queue.empty() or self.writing:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
        await self.sink.close()


_recorders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BatchRecorder] = weakref.WeakKeyDictionary()


def get_recorder() -> BatchRecorder:
    loop = asyncio.get_running_loop()
    recorder = _recorders.get(loop)
    if recorder is None:
        vendor = connections["default"].vendor
        sink = PostgresSink() if vendor == "postgresql" and settings.USAGE_GROUP_COMMIT else OrmSink()
        recorder = _recorders[loop] = BatchRecorder(sink)
    return recorder
