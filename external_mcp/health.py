"""Health checks: claim due servers, check them concurrently, derive status from hard facts.

Status follows healthchecks.io's pattern: facts (``consecutive_failures``, ``last_ok_at``,
``last_checked_at``) are stored and the status is derived from them (see ``status.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from external_mcp import catalog, mcp_client, metrics, storable
from external_mcp.auth_schemes import AuthScheme
from external_mcp.choices import ServerStatus, ToolState
from external_mcp.models import ExternalMcpServer, ExternalMcpTool, HealthCheck
from external_mcp.notifications import failure_ratio_alert
from external_mcp.oauth.grants import ConnectionNeeded
from external_mcp.outbound import scheme_for
from external_mcp.services import CredentialUnavailable
from external_mcp.status import transition

logger = logging.getLogger("external_mcp.health")

MAX_CAPABILITIES_BYTES = 64 * 1024

@dataclass
class Target:
    server: ExternalMcpServer
    scheme: AuthScheme | None
    failure: mcp_client.CheckResult | None = None


def timeouts() -> mcp_client.Timeouts:
    total = settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS / 1000
    return mcp_client.Timeouts(connect=min(5.0, total), step=total, total=total)


NEEDS_AUTH = ConnectionNeeded.error_class
"""The error class of a check that could not run: the server needs a connection nobody made."""


def prepare(server: ExternalMcpServer) -> Target:
    try:
        return Target(server=server, scheme=scheme_for(server, server.check_as_id))
    except ConnectionNeeded as exc:
        failure = mcp_client.CheckResult(ok=False, error_class=NEEDS_AUTH, error_message=str(exc))
    except (CredentialUnavailable, ValueError) as exc:
        failure = mcp_client.CheckResult(ok=False, error_class="credentials", error_message=str(exc))
    return Target(server=server, scheme=None, failure=failure)


async def run_checks(targets: list[Target], *, concurrency: int | None = None) -> list[mcp_client.CheckResult]:
    concurrency = concurrency or settings.EXTERNAL_MCP_HEALTH_CONCURRENCY
    semaphore = asyncio.Semaphore(concurrency)
    limits = timeouts()
    # Two connections a check: an HTTP+SSE server's stream stays open while its messages are posted.
    async with mcp_client.new_session(limit=2 * concurrency) as session:

        async def one(target: Target) -> mcp_client.CheckResult:
            if target.failure is not None:
                return target.failure
            async with semaphore:
                return await mcp_client.check(target.server.base_url, target.scheme, session=session,
                                              timeouts=limits, transport=target.server.transport)

        return await asyncio.gather(*(one(t) for t in targets))


def _bounded(capabilities: dict) -> dict:
    """The capabilities to keep: a server could send megabytes of them at every check."""
    size = len(storable.utf8(storable.canonical_json(capabilities)))
    return capabilities if size <= MAX_CAPABILITIES_BYTES else {"not_stored": f"{size} bytes of capabilities"}


def _ignored_note(result: mcp_client.CheckResult) -> str:
    ignored = 0 if not result.ok else sum(1 for raw in result.tools if not catalog.is_tool_entry(raw))
    if not ignored:
        return ""
    return (f"tools/list: {ignored} entries are not tools (an object with a string name) and were ignored."
            if ignored > 1 else "tools/list: 1 entry is not a tool (an object with a string name) and was ignored.")


def _store(server: ExternalMcpServer, result: mcp_client.CheckResult, now: datetime, *,
           quarantine_from: list | None = None) -> ExternalMcpServer:
    """One transaction: the check's facts, the status verdict and the catalog (or, for a check
    whose catalog could not be stored, the quarantine of what it could not verify)."""
    latency = int(result.total_ms)
    slow = result.ok and latency > settings.EXTERNAL_MCP_HEALTH_SLOW_MS
    note = _ignored_note(result)
    with transaction.atomic():
        # The row lock makes each check's verdict use the facts every earlier check left.
        row = ExternalMcpServer.objects.select_for_update().get(pk=server.pk)
        HealthCheck.objects.create(
            server=row, checked_at=now, ok=result.ok, slow=slow, error_class=result.error_class,
            error_message=storable.display_text(result.error_message or note, 2000), latency_ms=latency,
            protocol_version=storable.display_text(result.protocol_version, 20), timings_ms=result.timings_ms,
            tool_count=len(result.tools) if result.ok else None,
        )
        row.last_checked_at, row.last_latency_ms = now, latency
        if result.ok:
            message = (f"Slow: the check took {latency} ms (threshold {settings.EXTERNAL_MCP_HEALTH_SLOW_MS} ms)."
                       if slow else "")
            row.consecutive_failures, row.last_ok_at = 0, now
            row.error_message = " ".join(part for part in (message, note) if part)
            row.protocol_version = storable.display_text(result.protocol_version, 20)
            row.transport_found = result.transport
            row.server_info = storable.safe({
                "name": result.server_name, "version": result.server_version, "era": result.era,
                "capabilities": _bounded(result.capabilities), "card_url": result.card_url})
            target, reason = (ServerStatus.WARNING, message) if slow else (ServerStatus.HEALTHY, "Check succeeded.")
        elif result.error_class == NEEDS_AUTH:
            # Not the server's failure: nothing was sent to it. It waits for someone to connect.
            row.error_message = storable.display_text(result.error_message, 4000)
            target, reason = ServerStatus.NEEDS_AUTH, row.error_message
        else:
            row.consecutive_failures += 1
            row.error_message = storable.display_text(f"{result.error_message} {result.hint}".strip(), 4000)
            down = row.consecutive_failures >= settings.EXTERNAL_MCP_HEALTH_DOWN_AFTER
            target, reason = (ServerStatus.DOWN if down else ServerStatus.WARNING), row.error_message
        row.save(update_fields=["last_checked_at", "last_latency_ms", "consecutive_failures", "last_ok_at",
                                "error_message", "protocol_version", "server_info", "transport_found"])
        if row.status != ServerStatus.DISABLED:
            transition(server=row, new=target, reason=reason)
            if result.ok:
                catalog.catalog_sync(server=row, tools=result.tools, now=now)
        if quarantine_from is not None:
            catalog.catalog_quarantine(server=row, tools=quarantine_from, now=now)
    return row


def unrecorded(exc: BaseException, result: mcp_client.CheckResult) -> mcp_client.CheckResult:
    """The failed check that stands for a check whose result could not be stored."""
    return mcp_client.CheckResult(
        ok=False, error_class="record", timings_ms=result.timings_ms, total_ms=result.total_ms,
        error_message=f"The check's result could not be recorded ({type(exc).__name__}); approved tools whose "
                      "definition could not be verified are quarantined.",
    )


def record(*, server: ExternalMcpServer, result: mcp_client.CheckResult,
           now: datetime | None = None) -> tuple[mcp_client.CheckResult, ExternalMcpServer]:
    """Store one check's facts, derive the status with hysteresis, sync the tool catalog.

    Returns the check as recorded: a check whose result cannot be stored (whatever the upstream
    sent, whatever the database refused) is recorded as a failed check of class ``record``."""
    now = now or timezone.now()
    try:
        row = _store(server, result, now)
    except Exception as exc:  # noqa: BLE001 - an unrecordable check is a failed check, not a crash
        logger.exception("could not record the check of %s", server.pk)
        listing = result.tools if result.ok else None
        result = unrecorded(exc, result)
        row = _store(server, result, now, quarantine_from=listing)
    server_id = str(row.pk)
    if not result.ok:
        metrics.ERRORS.labels(server_id, "health", result.error_class or "unknown").inc()
    metrics.HEALTH_CHECKS.labels(server_id, "ok" if result.ok else "failure").inc()
    metrics.LATENCY.labels(server_id, "health").observe(result.total_ms / 1000)
    if row.status != ServerStatus.DISABLED:
        log = logger.info if result.ok else logger.warning
        log("health check", extra={"event": "health_check", "server": server_id,
                                   "workspace": str(row.workspace_id), "latency_ms": int(result.total_ms),
                                   "outcome": "ok" if result.ok else result.error_class, "status": row.status})
    return result, row


def record_check(*, server: ExternalMcpServer, result: mcp_client.CheckResult,
                 now: datetime | None = None) -> ExternalMcpServer:
    return record(server=server, result=result, now=now)[1]


def check_now(server: ExternalMcpServer) -> tuple[mcp_client.CheckResult, ExternalMcpServer]:
    """One check outside the schedule (registration, the Test button). Never raises for what the
    upstream sent: a check that cannot even be recorded as failed returns that failure unrecorded."""
    target = prepare(server)
    [result] = asyncio.run(run_checks([target], concurrency=1))
    try:
        return record(server=server, result=result)
    except Exception as exc:  # noqa: BLE001 - the database itself refused; show it, do not crash
        logger.exception("could not record the failed check of %s", server.pk)
        return unrecorded(exc, result), server


def claim_due(*, now: datetime, limit: int) -> list[ExternalMcpServer]:
    """Take due servers and push their next check forward in one transaction; rows another
    worker holds are skipped, so concurrent sweeps never check a server twice."""
    with transaction.atomic():
        due = list(
            ExternalMcpServer.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(enabled=True, next_check_at__lte=now)
            .order_by("next_check_at")[:limit]
        )
        by_interval: dict[int, list] = defaultdict(list)
        for server in due:
            by_interval[server.check_interval_seconds].append(server.pk)
        for interval, ids in by_interval.items():
            ExternalMcpServer.objects.filter(pk__in=ids).update(next_check_at=now + timedelta(seconds=interval))
    return list(ExternalMcpServer.objects.filter(pk__in=[s.pk for s in due])
                .select_related("credential", "workspace"))


def sweep(*, now: datetime | None = None, limit: int | None = None) -> int:
    now = now or timezone.now()
    servers = claim_due(now=now, limit=limit or settings.EXTERNAL_MCP_HEALTH_SWEEP_LIMIT)
    if not servers:
        return 0
    results = asyncio.run(run_checks([prepare(s) for s in servers]))
    for server, result in zip(servers, results, strict=True):
        try:
            record(server=server, result=result, now=timezone.now())
        except Exception:  # noqa: BLE001 - one bad row must not stop the sweep
            logger.exception("could not record the check of %s", server.pk)
    for workspace_id in {s.workspace_id for s in servers}:
        failure_ratio_alert(workspace_id=workspace_id)
    return len(servers)


def tools_callable(server_id: object) -> set[str]:
    return set(ExternalMcpTool.objects.filter(server_id=server_id, state=ToolState.APPROVED)
               .values_list("name", flat=True))
