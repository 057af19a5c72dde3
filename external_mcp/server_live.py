"""What the server page shows of a server's recent checks: status history, recent errors and the
latency chart. The page renders it once; a visible tab polls for it again (``server_detail``'s
partial) and gets the cards back only when a check or a status change has been recorded since."""

from __future__ import annotations

import json
from typing import Any

from external_mcp.models import ExternalMcpServer

CHART_POINTS = 100
HISTORY_ROWS = 20
ERROR_ROWS = 10


def live_version(server: ExternalMcpServer) -> str:
    """Changes whenever the cards could: a recorded check moves ``last_checked_at``, and any save of
    the server (a status change included) moves ``updated_at``."""
    return "|".join(f"{at.timestamp():.6f}" if at else "-" for at in (server.last_checked_at, server.updated_at))


def live_cards(server: ExternalMcpServer, *, badge: Any) -> dict[str, Any]:
    """The history, errors and chart context (three queries); ``badge`` turns a status into its badge."""
    checks = list(server.checks.all()[:CHART_POINTS])
    changes = list(server.status_changes.all()[:HISTORY_ROWS])
    for change in changes:
        change.old_badge, change.new_badge = badge(change.old), badge(change.new)
    latencies = sorted(c.latency_ms for c in checks if c.ok and c.latency_ms is not None)
    return {
        "changes": changes,
        "errors": list(server.checks.filter(ok=False)[:ERROR_ROWS]),
        # In an attribute of the canvas, not a json_script block: htmx drops <script> elements it swaps in.
        "chart_points": json.dumps([{"t": c.checked_at.isoformat(), "ms": c.latency_ms, "ok": c.ok}
                                    for c in reversed(checks)]),
        "chart_summary": {"count": len(checks), "min": latencies[0] if latencies else None,
                          "median": latencies[len(latencies) // 2] if latencies else None,
                          "max": latencies[-1] if latencies else None,
                          "failed": sum(1 for c in checks if not c.ok)},
    }
