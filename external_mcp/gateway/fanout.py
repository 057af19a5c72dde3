"""Resources and prompts at an aggregate endpoint: their lists gathered from the members that
offer them, each member bounded by ``EXTERNAL_MCP_FANOUT_TIMEOUT_MS`` (a slow or broken member is
left out of the list, it never holds it up), with names and URIs prefixed so a later read or get
finds its way back (``served_catalog.route_prefixed``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings

from external_mcp import sse
from external_mcp.exposed_names import SEPARATOR
from external_mcp.gateway import pipeline
from external_mcp.gateway.answers import InvalidAnswer, Screen
from external_mcp.gateway.call import Call
from external_mcp.gateway.errors import ProxyError, invalid_answer
from external_mcp.gateway.transport import read_whole
from external_mcp.gateway.upstream import Agent, connect
from external_mcp.jsonrpc import dumps, id_key, parse_json
from external_mcp.proxy_cache import KeyInfo, get_server
from external_mcp.served_catalog import PREFIXED_URI, Member, View
from usage.models import Outcome

logger = logging.getLogger("external_mcp.proxy")

LISTS = {
    "resources/list": ("resources", "resources", "uri"),
    "resources/templates/list": ("resources", "resourceTemplates", "uriTemplate"),
    "prompts/list": ("prompts", "prompts", "name"),
}
MAX_PAGES = 10


async def gather(call: Call, agent: Agent, view: View, key: KeyInfo, message: dict[str, Any]) -> dict[str, Any]:
    """The merged list: every serving member's entries, in member order, within the time bound."""
    capability, field, name_key = LISTS[message["method"]]
    members = sorted(view.serving(capability), key=lambda m: m.prefix)
    results = await asyncio.gather(*(_member_list(call, agent, key, member, message) for member in members))
    merged: list[Any] = []
    for member, entries in zip(members, results, strict=True):
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get(name_key), str):
                continue
            original = entry[name_key]
            exposed = _exposed(member, original, name_key) if view.prefixed else original
            view.origins[(capability, exposed)] = member.id
            merged.append({**entry, name_key: exposed})
    return {field: merged}


def _exposed(member: Member, original: str, name_key: str) -> str:
    if name_key == "name":
        return f"{member.prefix}{SEPARATOR}{original}"
    return f"{PREFIXED_URI}{member.prefix}/{original}"


async def _member_list(call: Call, agent: Agent, key: KeyInfo, member: Member,
                       message: dict[str, Any]) -> list[Any]:
    server = await get_server(member.id, key)
    if (server is None or not server.flag_on or server.disabled or server.credential_error
            or server.connection_needed):
        return []
    field = LISTS[message["method"]][1]
    entries: list[Any] = []
    params = {k: v for k, v in (message.get("params") or {}).items() if k == "_meta"}
    try:
        async with asyncio.timeout(settings.EXTERNAL_MCP_FANOUT_TIMEOUT_MS / 1000):
            for page in range(MAX_PAGES):
                request = {"jsonrpc": "2.0", "id": page + 1, "method": message["method"], "params": params}
                result = await _fetch(call, agent, key, member, server, request)
                items = result.get(field) if isinstance(result, dict) else None
                entries.extend(items if isinstance(items, list) else [])
                cursor = result.get("nextCursor") if isinstance(result, dict) else None
                if not isinstance(cursor, str) or not cursor:
                    break
                params = {**params, "cursor": cursor}
    except TimeoutError:
        logger.warning("%s of server %s took longer than EXTERNAL_MCP_FANOUT_TIMEOUT_MS; listed without it",
                       message["method"], member.id)
    except ProxyError as exc:
        logger.warning("%s of server %s failed (%s); listed without it", message["method"], member.id, exc.message)
    return entries


async def _fetch(call: Call, agent: Agent, key: KeyInfo, member: Member, server: Any,
                 request: dict[str, Any]) -> Any:
    """One list request to one member, recorded as a usage event of that server."""
    sub = Call(method="POST", request_id=call.request_id, key=key, server=server, endpoint=call.endpoint,
               toolset_id=call.toolset_id, messages=[request], body=dumps(request))
    sub.screen = Screen(sub.messages, lambda _tool: True)
    try:
        response = await connect(sub, agent, member, server, request)
        async with response:
            sub.upstream_status = sub.status = response.status
            body = await read_whole(sub, response)
        if response.status >= 400:
            raise invalid_answer(server, f"is HTTP {response.status}")
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            parser = sse.Parser()
            for event in [*parser.feed(body), *parser.close()[0]]:
                sub.screen.event(event)
        else:
            try:
                sub.screen.json_answer(body)
            except InvalidAnswer as exc:
                raise invalid_answer(server, str(exc)) from None
        reply = sub.screen.replies.get(id_key(request["id"]))
        if reply is None:
            raise invalid_answer(server, "has no response to the list request")
        answer = parse_json(reply.raw)
        if "error" in answer:
            sub.outcome = Outcome.ERROR
            return None
        return answer.get("result")
    except ProxyError as exc:
        sub.failure = exc
        sub.outcome, sub.error_code, sub.status = exc.outcome, exc.code, exc.status
        raise
    finally:
        await pipeline.record(sub)
