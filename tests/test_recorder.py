"""Group commit of usage events on PostgreSQL: every event stored exactly once, whatever the
batch size (one or two rows as VALUES, more through unnest arrays), NULLs and text included."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import pytest
from django.db import connections

from usage.models import UsageEvent
from usage.recorder import BatchRecorder, OrmSink, PostgresSink, server_settings

pytestmark = pytest.mark.django_db(transaction=True)


def event(i: int, *, workspace_id: uuid.UUID) -> dict:
    return {
        "created_at": datetime(2026, 11, 24, 12, 0, i % 60, tzinfo=UTC), "user_id": i if i % 3 else None,
        "workspace_id": workspace_id, "server_id": uuid.uuid4(), "api_key_id": None if i % 2 else uuid.uuid4(),
        "endpoint": ("server", "workspace", "toolset")[i % 3], "toolset_id": uuid.uuid4() if i % 3 == 2 else None,
        "method": "tools/call" if i % 4 else "ping", "tool_name": f"outil-é-{i}" if i % 4 else "",
        "jsonrpc_id": str(i), "request_id": uuid.uuid4().hex, "tokens_in": i, "tokens_out": 2 * i, "bytes_in": 3 * i,
        "bytes_out": 2**40 + i, "latency_ms": i / 7, "upstream_status": None if i % 5 == 0 else 200,
        "jsonrpc_error_code": -32602 if i % 6 == 0 else None, "outcome": "ok", "counted": bool(i % 2),
    }


@pytest.mark.parametrize("burst", [1, 2, 3, 250])
def test_every_event_of_a_burst_is_stored_exactly_once(burst):
    assert connections["default"].vendor == "postgresql"
    workspace_id = uuid.uuid4()
    rows = [event(i, workspace_id=workspace_id) for i in range(burst)]
    sink = PostgresSink()
    sizes: list[int] = []
    write = sink.write

    async def counting_write(batch):
        sizes.append(len(batch))
        await write(batch)

    sink.write = counting_write  # type: ignore[method-assign]

    async def scenario() -> None:
        recorder = BatchRecorder(sink)
        await asyncio.gather(*(recorder.record(row) for row in rows))
        await recorder.close()

    asyncio.run(scenario())
    assert sum(sizes) == burst
    if burst > PostgresSink.SMALL:
        assert max(sizes) > PostgresSink.SMALL  # the unnest path ran
    stored = {e.request_id: e for e in UsageEvent.objects.filter(workspace_id=workspace_id)}
    assert len(stored) == burst
    for row in rows:
        got = stored[row["request_id"]]
        assert {column: getattr(got, column) for column in row} == row


@pytest.mark.parametrize("sink", [PostgresSink, OrmSink])
def test_a_row_the_database_refuses_costs_no_other_event(sink, caplog):
    """One refused row must not take its batch with it: the others are stored, the refused one is
    logged in full so it can be replayed."""
    workspace_id = uuid.uuid4()
    rows = [event(i, workspace_id=workspace_id) for i in range(1, 41)]
    rows[7]["jsonrpc_error_code"] = 2**40  # past the integer column

    async def scenario() -> None:
        recorder = BatchRecorder(sink())
        await asyncio.gather(*(recorder.record(row) for row in rows))
        await recorder.close()

    with caplog.at_level(logging.ERROR, logger="usage.recorder"):
        asyncio.run(scenario())
    stored = set(UsageEvent.objects.filter(workspace_id=workspace_id).values_list("request_id", flat=True))
    assert stored == {row["request_id"] for row in rows} - {rows[7]["request_id"]}
    refused = [r.getMessage() for r in caplog.records if r.name == "usage.recorder" and r.levelno == logging.ERROR]
    assert len(refused) == 1 and rows[7]["request_id"] in refused[0]


def test_close_waits_for_events_handed_over_before_it():
    workspace_id = uuid.uuid4()
    rows = [event(i, workspace_id=workspace_id) for i in range(40)]

    async def scenario() -> None:
        recorder = BatchRecorder(PostgresSink())
        pending = [asyncio.ensure_future(recorder.record(row)) for row in rows]
        await asyncio.sleep(0)  # handed over, not yet written
        await recorder.close()
        await asyncio.wait_for(asyncio.gather(*pending), timeout=60)  # reached only if close() lost events

    asyncio.run(scenario())
    assert UsageEvent.objects.filter(workspace_id=workspace_id).count() == 40


def test_the_event_writer_takes_django_session_settings():
    assert server_settings({"options": "-c search_path=usage,public --statement-timeout=5s -cwork_mem=4MB",
                            "application_name": "twinmcp"}) == {
        "search_path": "usage,public", "statement_timeout": "5s", "work_mem": "4MB", "application_name": "twinmcp"}
    assert server_settings({}) == {}


def test_the_event_writer_inserts_where_a_search_path_points(settings):
    """A deployment whose tables live in another schema (``OPTIONS: {"options": "-c search_path=…"}``)
    gets its events there, not an error per batch."""
    with connections["default"].cursor() as cursor:
        cursor.execute("CREATE SCHEMA IF NOT EXISTS elsewhere")
        cursor.execute("CREATE TABLE IF NOT EXISTS elsewhere.external_mcp_usage_logs "
                       "(LIKE public.external_mcp_usage_logs INCLUDING ALL)")
    workspace_id = uuid.uuid4()
    options = {**connections["default"].settings_dict["OPTIONS"], "options": "-c search_path=elsewhere"}
    original = connections["default"].settings_dict["OPTIONS"]
    connections["default"].settings_dict["OPTIONS"] = options
    try:
        async def scenario() -> None:
            recorder = BatchRecorder(PostgresSink())
            await recorder.record(event(1, workspace_id=workspace_id))
            await recorder.close()

        asyncio.run(scenario())
    finally:
        connections["default"].settings_dict["OPTIONS"] = original
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM elsewhere.external_mcp_usage_logs WHERE workspace_id = %s",
                       [workspace_id])
        assert cursor.fetchone()[0] == 1
        cursor.execute("DROP SCHEMA elsewhere CASCADE")
    assert not UsageEvent.objects.filter(workspace_id=workspace_id).exists()
