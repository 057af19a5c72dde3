"""What an operator reads about each proxied request: its one log line (endpoint, redacted detail)
and, with ``EXTERNAL_MCP_STAGE_TIMERS``, where its time went; and the cheap ids and host checks
every request runs."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from external_mcp.gateway import inbound
from external_mcp.gateway.errors import ProxyError
from tests import mcp_peers
from tests.bench.proxy_bench import body as bench_body
from tests.gateway import proxy_url, register
from tests.test_proxy import call, post
from twinmcp.ids import random_hex
from twinmcp.jsonlog import JsonFormatter

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("midday", "proxy_settings")]

PER_SERVER_STAGES = ["auth", "request", "quota", "upstream", "relay", "record"]


def proxied_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "proxy_request"]


def test_stage_timers_are_off_by_default_and_split_the_whole_time_when_on(admin, flag_on, gateway, settings,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="external_mcp.proxy")
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        assert asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"})))[0] == 200
        settings.EXTERNAL_MCP_STAGE_TIMERS = True
        assert asyncio.run(post(url, admin.raw_key, call("echo", {"text": "y"}, 2)))[0] == 200
    off, on = proxied_lines(caplog)
    assert off.stages is None and "stages" not in json.loads(JsonFormatter().format(off))
    assert list(on.stages) == PER_SERVER_STAGES
    assert all(ms >= 0 for ms in on.stages.values())
    # Each lap starts where the previous one ended; the event's latency is taken as its write begins.
    before_record = sum(ms for stage, ms in on.stages.items() if stage != "record")
    assert before_record - 0.01 <= on.latency_ms <= sum(on.stages.values()) + 0.01
    assert json.loads(JsonFormatter().format(on))["stages"] == on.stages


def test_the_workspace_endpoint_times_its_routing_and_names_its_endpoint(admin, flag_on, gateway, settings, caplog):
    settings.EXTERNAL_MCP_STAGE_TIMERS = True
    caplog.set_level(logging.INFO, logger="external_mcp.proxy")
    with mcp_peers.stateless_peer() as peer:
        server = register(admin, peer, name="Alpha")
        status, _, body = asyncio.run(post(f"{gateway.base}/api/v1/external-mcp/mcp", admin.raw_key,
                                           json.loads(bench_body(1, "alpha__echo")),
                                           **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                                              "Mcp-Name": "alpha__echo"}))
    assert status == 200, body
    lines = [r for r in proxied_lines(caplog) if r.method == "tools/call"]
    assert [(r.endpoint, r.server) for r in lines] == [("workspace", str(server.pk))]
    assert {"auth", "route", "quota", "upstream", "relay", "record"} <= set(lines[0].stages)


def test_the_log_line_redacts_the_detail_it_carries():
    record = logging.LogRecord("external_mcp.proxy", logging.INFO, __file__, 1, "proxied request", None, None)
    record.event, record.endpoint = "proxy_request", "server"
    record.detail = "ClientResponseError: 401, Authorization: Bearer upstream-secret-token-123"
    line = json.loads(JsonFormatter().format(record))
    assert line["endpoint"] == "server"
    assert "upstream-secret-token-123" not in line["detail"] and "[redacted]" in line["detail"]


def test_generated_ids_are_32_hex_digits_and_do_not_repeat():
    ids = {random_hex() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)


def test_the_remembered_host_verdict_follows_the_setting(settings):
    settings.ALLOWED_HOSTS = ["gw.example"]
    inbound.check_host({b"host": b"gw.example:8000"})
    with pytest.raises(ProxyError) as refused:
        inbound.check_host({b"host": b"evil.example"})
    assert refused.value.status == 421
    with pytest.raises(ProxyError) as origin:
        inbound.check_host({b"host": b"gw.example", b"origin": b"https://evil.example"})
    assert origin.value.status == 403
    settings.ALLOWED_HOSTS = ["evil.example"]
    inbound.check_host({b"host": b"evil.example"})
    with pytest.raises(ProxyError):
        inbound.check_host({b"host": b"gw.example:8000"})
