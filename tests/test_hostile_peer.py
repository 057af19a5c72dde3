"""The hostile peer does what it is told on the wire, and is MCP enough for a health check."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from external_mcp import mcp_client
from external_mcp.auth_schemes import build_scheme
from tests.hostile_peer import Close, HostilePeer, Sleep, http_head, json_answer, mcp_handler


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, data=b'{"id":1}') as response:
        return response.status, await response.read()


def test_a_declared_length_longer_than_the_body_is_a_cut_body():
    with HostilePeer(lambda request: [*json_answer(b'{"jsonrpc":', length=100), Close()]) as peer:
        with pytest.raises(aiohttp.ClientPayloadError):
            asyncio.run(_get(peer.url))
        assert peer.requests[0].body == b'{"id":1}'


def test_a_body_without_length_ends_at_close_and_steps_run_in_order():
    steps = [http_head(200, length=None), b"first ", Sleep(0.01), b"second"]
    with HostilePeer(lambda request: steps) as peer:
        assert asyncio.run(_get(peer.url)) == (200, b"first second")


def test_the_mcp_handler_passes_a_health_check(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]

    async def check(url: str) -> mcp_client.CheckResult:
        async with mcp_client.new_session() as session:
            return await mcp_client.check(url, build_scheme("none", None), session=session)

    with HostilePeer(mcp_handler()) as peer:
        result = asyncio.run(check(peer.url))
    assert result.ok, result.error_message
    assert [t["name"] for t in result.tools] == ["echo"]
