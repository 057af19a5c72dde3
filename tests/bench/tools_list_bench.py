"""Part of `make bench` (run by ``tests.bench.proxy_bench``): ``tools/list`` on the workspace
endpoint ``/api/v1/external-mcp/mcp`` of a workspace holding 1,000 approved tools across 20
servers, answered from the approved catalog.

The servers are rows only: their ``base_url`` is a recording listener on loopback that counts
the connections it accepts, so the run shows that no upstream was contacted. Measured at C = 1,
in alternating rounds: the first page alone, and whole walks (every page, following
``nextCursor``); latency is the client's, from sending each request to the last byte of its
answer (the client's parsing of a page is left out), CPU is the gateway's (from /proc). Then a
few cold walks, each right after a cache flush (``twinmcp.invalidation``), where the gateway
rebuilds the catalog view from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from datetime import timedelta
from typing import Any

import aiohttp

MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
VERBS = ("list", "get", "create", "update", "delete")
RESOURCES = ("issue", "pull_request", "repository", "branch", "commit", "file", "release", "workflow_run",
             "deployment", "team")


class Recorder:
    """A TCP listener that accepts and counts connections (and closes them at once): the stand-in
    for upstreams that must never be contacted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="upstream-recorder", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def tool_definition(server: str, verb: str, resource: str) -> dict[str, Any]:
    """A tool definition of the size and shape real servers list (about 1 KB)."""
    label = resource.replace("_", " ")
    properties: dict[str, Any] = {
        "owner": {"type": "string", "description": "The account that owns the repository (user or organisation)."},
        "repo": {"type": "string", "description": "The repository's name, without the owner."},
    }
    required = ["owner", "repo"]
    if verb == "list":
        properties |= {
            "state": {"type": "string", "enum": ["open", "closed", "all"], "default": "open",
                      "description": f"Which {label}s to return."},
            "sort": {"type": "string", "enum": ["created", "updated"], "default": "created"},
            "page": {"type": "integer", "minimum": 1, "default": 1, "description": "The page of results."},
            "per_page": {"type": "integer", "minimum": 1, "maximum": 100, "default": 30,
                         "description": "Results per page (at most 100)."},
        }
    else:
        if verb != "create":
            properties[f"{resource}_id"] = {"type": "integer", "description": f"The {label}'s number."}
            required.append(f"{resource}_id")
        if verb in ("create", "update"):
            properties |= {
                "title": {"type": "string", "maxLength": 256, "description": f"The {label}'s title."},
                "body": {"type": "string", "description": "Markdown text; mentions and references are linked."},
                "labels": {"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                           "description": "Label names to set; unknown labels are created."},
            }
            if verb == "create":
                required.append("title")
    description = (f"{verb.capitalize()} {label}s in a repository of {server}. "
                   + {"list": "Results are paginated with page and per_page, newest first by default.",
                      "get": "Returns every field, including its author, timestamps and links.",
                      "create": "The caller must have write access; returns the new object.",
                      "update": "Only the fields given are changed; returns the updated object.",
                      "delete": "This cannot be undone; the caller must be an admin of the repository."}[verb])
    return {
        "name": f"{verb}_{resource}",
        "title": f"{verb.capitalize()} {label}",
        "description": description,
        "inputSchema": {"type": "object", "properties": properties, "required": required,
                        "additionalProperties": False},
        "annotations": {"readOnlyHint": verb in ("list", "get"), "destructiveHint": verb == "delete",
                        "idempotentHint": verb != "create", "openWorldHint": True},
    }


def view_build_ms(workspace_id: Any, times: int) -> list[float]:
    """What a cold ``tools/list`` pays inside the gateway, timed here in process: the catalog view
    built from PostgreSQL (``served_catalog.build_view``) and every page serialised."""
    from external_mcp.served_catalog import build_view

    out = []
    for _ in range(times):
        started = time.perf_counter()
        view = build_view(workspace_id)
        assert view is not None
        cursor = None
        while True:
            _, cursor = view.page(cursor)
            if cursor is None:
                break
        out.append((time.perf_counter() - started) * 1000)
    return out


def setup_listing_data(upstream_url: str, servers: int, tools_per_server: int) -> tuple[str, int, Any]:
    """A second workspace (flag on, a key) whose servers, written directly to the database, have
    ``tools_per_server`` approved tools each and point at ``upstream_url``. Returns the raw key,
    the number of approved tools and the workspace's id. Django must be set up."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from external_mcp import catalog
    from external_mcp.choices import ServerStatus, ToolState
    from external_mcp.exposed_names import derive_prefix
    from external_mcp.models import ExternalMcpServer, ExternalMcpTool
    from twinmcp import services as core
    from twinmcp.flags import flag_enable_for_workspace

    if tools_per_server > len(VERBS) * len(RESOURCES):
        raise SystemExit(f"at most {len(VERBS) * len(RESOURCES)} tools per server")
    workspace = core.workspace_create(slug=f"bench-list-{int(time.time())}", name="Benchmark: catalog")
    user = get_user_model().objects.create_user(username=workspace.slug, password=None)
    core.member_add(workspace=workspace, user=user, role="admin")
    flag_enable_for_workspace(workspace=workspace)
    _, raw = core.api_key_create(user=user, workspace=workspace, name="bench-list")
    now = timezone.now()
    taken: set[str] = set()
    rows = []
    for i in range(servers):
        name = f"Catalog {i:02d}"
        prefix = derive_prefix(name, taken)
        taken.add(prefix)
        rows.append(ExternalMcpServer(
            workspace=workspace, created_by=user, name=name, prefix=prefix, base_url=upstream_url,
            status=ServerStatus.HEALTHY, protocol_version=MODERN, last_checked_at=now, last_ok_at=now,
            next_check_at=now + timedelta(days=1),
            server_info={"era": "stateless", "capabilities": {"tools": {"listChanged": True}}}))
    created = ExternalMcpServer.objects.bulk_create(rows)
    tools = []
    for server in created:
        pairs = [(verb, resource) for resource in RESOURCES for verb in VERBS][:tools_per_server]
        for verb, resource in pairs:
            definition = catalog.canonical_definition(tool_definition(server.name, verb, resource))
            digest = catalog.definition_hash(definition)
            tools.append(ExternalMcpTool(
                server=server, name=definition["name"], title=definition["title"],
                description=definition["description"], input_schema=definition["inputSchema"],
                annotations=definition["annotations"], definition=definition, definition_hash=digest,
                state=ToolState.APPROVED, approved_definition=definition, approved_hash=digest, approved_at=now,
                approved_by=user, first_seen_at=now, last_seen_at=now))
    ExternalMcpTool.objects.bulk_create(tools, batch_size=500)
    return raw, len(tools), workspace.pk


def answer_of(payload: bytes, content_type: str, request_id: int) -> dict[str, Any]:
    """The JSON-RPC answer to ``request_id`` in a JSON body or an SSE stream (the gateway may
    answer either way to a client that accepts both)."""
    if not content_type.startswith("text/event-stream"):
        return json.loads(payload)
    for event in payload.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if data:
            message = json.loads(data)
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
    raise ValueError("no answer in the event stream")


def list_body(i: int, cursor: str | None) -> bytes:
    params: dict[str, Any] = {"_meta": META}
    if cursor is not None:
        params["cursor"] = cursor
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/list", "params": params}).encode()


class Lister:
    """Sends ``tools/list`` requests, one at a time, and checks every answer."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, expected: int, page_size: int) -> None:
        self.session, self.url, self.expected, self.page_size = session, url, expected, page_size
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list", "Authorization": f"Bearer {key}"}
        self.ids = iter(range(1, 1 << 60))
        self.errors = 0
        self.bytes = 0
        self.first_error = ""
        """The start of the first answer that was not a good page, to show what went wrong."""

    def _failed(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:300]

    async def page(self, cursor: str | None) -> tuple[float, list[str], str | None]:
        """One page: its latency in ms (to the last byte), its tool names and the next cursor."""
        request_id = next(self.ids)
        data = list_body(request_id, cursor)
        started = time.perf_counter()
        try:
            async with self.session.post(self.url, data=data, headers=self.headers) as response:
                payload = await response.read()
                status, content_type = response.status, response.headers.get("Content-Type", "")
        except aiohttp.ClientError as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return (time.perf_counter() - started) * 1000, [], None
        elapsed = (time.perf_counter() - started) * 1000
        self.bytes += len(payload)
        try:
            answer = answer_of(payload, content_type, request_id)
            result = answer["result"]
            names = [tool["name"] for tool in result["tools"]]
            cursor = result.get("nextCursor")
        except (ValueError, KeyError, TypeError):
            self._failed(f"HTTP {status}: {payload[:300]!r}")
            return elapsed, [], None
        if status != 200 or "error" in answer:
            self._failed(f"HTTP {status}: {payload[:300]!r}")
        return elapsed, names, cursor if isinstance(cursor, str) else None

    async def first_page(self) -> float:
        elapsed, names, cursor = await self.page(None)
        if len(names) != min(self.page_size, self.expected) or (cursor is None) != (self.expected <= self.page_size):
            self._failed(f"first page: {len(names)} tools, next cursor {cursor!r}")
        return elapsed

    async def walk(self) -> tuple[float, float, int]:
        """Every page: the first page's latency, the sum of all pages' latencies, how many pages."""
        first, names, cursor = await self.page(None)
        total, pages, seen = first, 1, list(names)
        while cursor is not None and pages < 100:
            elapsed, names, cursor = await self.page(cursor)
            total, pages = total + elapsed, pages + 1
            seen += names
        if len(seen) != self.expected or len(set(seen)) != self.expected or not all("__" in n for n in seen):
            self._failed(f"walk: {len(seen)} tools ({len(set(seen))} names) in {pages} pages")
        return first, total, pages


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"n": len(ordered), "p50": statistics.median(ordered), "p95": pct(0.95), "p99": pct(0.99),
            "max": ordered[-1]}


async def measure_listing(url: str, key: str, expected: int, requests: int, rounds: int, cold: int,
                          cpu: Any, flush: Any, workspace_id: Any) -> dict[str, Any]:
    """``requests`` first pages and ``requests`` walks in ``rounds`` alternating rounds, then
    ``cold`` walks each after ``flush()``, and ``cold`` view builds in process. ``cpu()`` is the
    gateway's CPU seconds so far."""
    from django.conf import settings

    page_size = settings.EXTERNAL_MCP_TOOLS_PAGE_SIZE
    per_round = max(1, requests // rounds)
    first_pages: list[float] = []
    walk_first: list[float] = []
    walks: list[float] = []
    cpu_first = cpu_walk = 0.0
    pages = walk_bytes = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        lister = Lister(session, url, key, expected, page_size)
        for _ in range(5):  # builds the view, serialises its pages, opens the connection
            await lister.walk()
        warm_errors, lister.errors = lister.errors, 0
        for _ in range(rounds):
            before = cpu()
            for _ in range(per_round):
                first_pages.append(await lister.first_page())
            cpu_first += cpu() - before
            before, sent = cpu(), lister.bytes
            for _ in range(per_round):
                first, total, count = await lister.walk()
                walk_first.append(first)
                walks.append(total)
                pages = count
            cpu_walk += cpu() - before
            walk_bytes += lister.bytes - sent
        warm_walk_errors = lister.errors
        cold_first: list[float] = []
        cold_walks: list[float] = []
        cold_cpu = 0.0
        lister.errors = 0
        for _ in range(cold):
            await asyncio.to_thread(flush)  # Django's database calls stay out of the event loop
            await asyncio.sleep(0.3)  # the gateway hears the flush on its Redis channel
            before = cpu()
            first, total, _count = await lister.walk()
            cold_cpu += cpu() - before
            cold_first.append(first)
            cold_walks.append(total)
    builds = await asyncio.to_thread(view_build_ms, workspace_id, cold) if cold else []
    return {
        "tools": expected, "page_size": page_size, "pages_per_walk": pages, "warm_up_errors": warm_errors,
        "first_page": {**_stats(first_pages), "cpu_ms": cpu_first * 1000 / len(first_pages)},
        "walk_first_page": _stats(walk_first),
        "walk": {**_stats(walks), "cpu_ms": cpu_walk * 1000 / len(walks)},
        "errors": warm_walk_errors, "bytes_per_walk": walk_bytes // len(walks), "first_error": lister.first_error,
        "cold": ({"first_page": _stats(cold_first), "walk": {**_stats(cold_walks), "cpu_ms": cold_cpu * 1000 / cold},
                  "errors": lister.errors, "view_build": _stats(builds)} if cold else None),
    }


def print_listing(result: dict[str, Any], servers: int, recorder_port: int, contacted: int,
                  contacted_total: int) -> None:
    print(f"\ntools/list on the workspace endpoint: {result['tools']} approved tools across {servers} servers, "
          f"page size {result['page_size']} ({result['pages_per_walk']} pages, "
          f"{result['bytes_per_walk'] / 1024:.0f} KiB per walk), C = 1, latency to the last byte")
    print(f"{'what':<30} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU ms':>8}")
    rows = [("first page", result["first_page"], result["first_page"]["cpu_ms"]),
            ("full walk (sum of pages)", result["walk"], result["walk"]["cpu_ms"])]
    if result["cold"]:
        rows += [("cold first page (after flush)", result["cold"]["first_page"], None),
                 ("cold full walk (after flush)", result["cold"]["walk"], result["cold"]["walk"]["cpu_ms"]),
                 ("view build + pages, in process", result["cold"]["view_build"], None)]
    for name, stats, cpu_ms in rows:
        shown = f"{cpu_ms:>8.2f}" if cpu_ms is not None else f"{'':>8}"
        print(f"{name:<30} {stats['n']:>5} {stats['p50']:>8.2f} {stats['p95']:>8.2f} {stats['p99']:>8.2f} "
              f"{stats['max']:>8.2f} {shown}")
    errors = result["errors"] + result["warm_up_errors"] + (result["cold"]["errors"] if result["cold"] else 0)
    if result["first_error"]:
        print(f"first error: {result['first_error']}")
    print(f"errors: {errors}; CPU is the gateway's, per request (first page) or per walk (every page); the view is "
          "rebuilt after each flush and every EXTERNAL_MCP_PROXY_CACHE_SECONDS.")
    print(f"upstream connections to the servers' base_url (recording listener on 127.0.0.1:{recorder_port}): "
          f"{contacted} during the listing, {contacted_total} since the gateway started")
    first, walk = result["first_page"], result["walk"]

    def verdict(stats: dict[str, float]) -> str:
        return "met" if stats["p50"] <= 5 and errors == 0 and contacted_total == 0 else "NOT met"

    print(f"target <= 5 ms gateway time per tools/list (p50 to the last byte): first page {verdict(first)} "
          f"(p50 {first['p50']:.2f} ms, p95 {first['p95']:.2f} ms, CPU {first['cpu_ms']:.2f} ms); "
          f"full walk {verdict(walk)} (p50 {walk['p50']:.2f} ms, p95 {walk['p95']:.2f} ms, "
          f"CPU {walk['cpu_ms']:.2f} ms)")
