"""Whether a server's recorded status can still be believed.

A status is the verdict of the last check. When checks stop — Celery beat or every worker down,
a broker outage — nothing updates it, and "healthy" would be shown for ever. So the status shown
(list, page, API, /metrics) is derived when read from stored facts: a server that is enabled and
whose last check (or registration, if never checked) is older than
``EXTERNAL_MCP_HEALTH_STALE_INTERVALS`` of its own check intervals, plus one sweep period and
the check timeout, is *stale*. Nothing stores "stale", so nothing has to remember to clear it:
the next recorded check makes the server fresh again.

The rule has two forms, one for Python (``shown_status``) and one for SQL (``ServerQuerySet``'s
``with_shown_status``, for filters and sorting); ``tests/test_health_staleness.py`` checks they agree.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.utils import timezone

from external_mcp.choices import ServerStatus

if TYPE_CHECKING:
    from external_mcp.models import ExternalMcpServer


def grace_parts() -> tuple[int, timedelta]:
    """(intervals, slack): a server is stale ``intervals × check_interval_seconds + slack`` after
    its last check. The slack covers a sweep that has not started yet and one that is running."""
    slack = timedelta(seconds=settings.EXTERNAL_MCP_HEALTH_SWEEP_SECONDS,
                      milliseconds=settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS)
    return settings.EXTERNAL_MCP_HEALTH_STALE_INTERVALS, slack


def stale_since(server: ExternalMcpServer) -> datetime | None:
    """When the server's recorded status stops being believable (None for a disabled server)."""
    if not server.enabled or server.status == ServerStatus.DISABLED:
        return None
    intervals, slack = grace_parts()
    reference = server.last_checked_at or server.created_at
    return reference + timedelta(seconds=intervals * server.check_interval_seconds) + slack


def is_stale(server: ExternalMcpServer, now: datetime | None = None) -> bool:
    since = stale_since(server)
    return since is not None and since < (now or timezone.now())


def shown_status(server: ExternalMcpServer, now: datetime | None = None) -> str:
    """The status to show: the recorded one, or ``stale`` when it can no longer be believed."""
    return ServerStatus.STALE if is_stale(server, now) else server.status
