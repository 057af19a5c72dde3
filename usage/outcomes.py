"""How each request outcome is shown: its label (from ``Outcome``) and its chart colour, in one
place for the dashboard's charts, tables and legend."""

from __future__ import annotations

from usage.models import Outcome

OUTCOME_COLOURS: dict[str, str] = {
    Outcome.OK: "#2352c9",
    Outcome.ERROR: "#b42318",
    Outcome.TIMEOUT: "#c77700",
    Outcome.UPSTREAM_ERROR: "#7a2e0e",
    Outcome.QUOTA: "#6941c6",
    Outcome.BLOCKED: "#344054",
    Outcome.CLIENT_DISCONNECT: "#8a9099",
}

# Column headings where the table is tight; the full label stays the cell's data-label and title.
OUTCOME_SHORT_LABELS: dict[str, str] = {
    Outcome.OK: "OK",
    Outcome.ERROR: "Error",
    Outcome.TIMEOUT: "Timeout",
    Outcome.UPSTREAM_ERROR: "Upstream error",
    Outcome.QUOTA: "Quota",
    Outcome.BLOCKED: "Blocked",
    Outcome.CLIENT_DISCONNECT: "Disconnected",
}

# Table and legend order: success first, then the upstream's failures, then TwinMCP's refusals.
OUTCOME_ORDER = (Outcome.OK, Outcome.ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_ERROR, Outcome.QUOTA, Outcome.BLOCKED,
                 Outcome.CLIENT_DISCONNECT)


def outcome_legend() -> list[dict[str, str]]:
    return [{"value": o.value, "label": o.label, "short": OUTCOME_SHORT_LABELS[o], "colour": OUTCOME_COLOURS[o]}
            for o in OUTCOME_ORDER]
