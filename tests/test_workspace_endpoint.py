"""The workspace endpoint: every approved tool of the workspace's servers behind one URL, named
``<prefix>__<tool>``, served from the catalog, each call routed to its own server."""

from __future__ import annotations

import asyncio

import pytest

from tests import mcp_peers
from tests.gateway import agent, register
from usage.models import Endpoint, UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]


def workspace_url(gateway) -> str:
    return f"{gateway.base}/api/v1/external-mcp/mcp"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
def test_two_servers_with_the_same_tool_names_meet_prefixed_and_each_call_reaches_its_own(
        admin, gateway, mode):
    with mcp_peers.default_peer() as first, mcp_peers.stateless_peer() as second:
        one = register(admin, first, name="Alpha")
        two = register(admin, second, name="Beta")

        async def scenario():
            async with agent(workspace_url(gateway), admin.raw_key, mode=mode) as client:
                tools = await client.list_tools()
                result = await client.call_tool("beta__echo", {"text": "to beta"})
                return sorted(t.name for t in tools.tools), result

        first.clear_requests()
        second.clear_requests()
        names, result = asyncio.run(scenario())
    assert names == sorted(f"{p}__{t}" for p in ("alpha", "beta") for t in ("add", "count", "echo", "slow_echo"))
    assert result.content[0].text == "to beta"
    assert [r.rpc_method for r in first.requests_to()] == []
    assert "tools/list" not in [r.rpc_method for r in second.requests_to()]
    calls = [r.json() for r in second.requests_to(rpc_method="tools/call")]
    assert [c["params"]["name"] for c in calls] == ["echo"]
    event = UsageEvent.objects.get(method="tools/call")
    assert (event.server_id, event.tool_name, event.endpoint, event.counted) == (two.pk, "echo", Endpoint.WORKSPACE,
                                                                                 True)
    assert one.pk != two.pk
