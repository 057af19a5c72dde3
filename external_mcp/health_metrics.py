"""Health metrics computed from the database when /metrics is scraped.

When Celery beat or the workers stop, nothing runs that could update an in-process gauge: a gauge
set by the last check would go on saying "healthy". These values are therefore read from stored
facts at every scrape, so they stay true when no check runs:

- ``external_mcp_availability{server_id}``: 1 healthy, 0.5 warning, 0 down — only for servers whose
  status is believable; a stale server has no value (unknown).
- ``external_mcp_servers{status}``: servers per shown status, ``stale`` included (bounded labels).
- ``external_mcp_health_last_check_timestamp_seconds``: the newest check of any monitored server
  (the oldest registration while none was ever checked); the alert ``ExternalMCPHealthChecksStopped``
  fires when it is five minutes old.
- ``external_mcp_health_next_check_timestamp_seconds``: the oldest due time of a monitored server;
  in the past for more than a sweep period means no sweep claims checks.

Disabled servers are not monitored: they have no availability and do not move the timestamps.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from django.db import DatabaseError
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from external_mcp import staleness
from external_mcp.choices import ServerStatus
from external_mcp.models import ExternalMcpServer

logger = logging.getLogger(__name__)

AVAILABILITY_VALUE = {ServerStatus.HEALTHY: 1.0, ServerStatus.WARNING: 0.5, ServerStatus.DOWN: 0.0}


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "availability": GaugeMetricFamily(
            "external_mcp_availability",
            "1 healthy, 0.5 warning, 0 down, per external MCP server whose last check is recent (none when stale).",
            labels=["server_id"]),
        "servers": GaugeMetricFamily(
            "external_mcp_servers", "External MCP servers by shown status (stale: no recent check).",
            labels=["status"]),
        "last_check": GaugeMetricFamily(
            "external_mcp_health_last_check_timestamp_seconds",
            "Unix time of the newest health check of any enabled server (its registration if none was checked)."),
        "next_check": GaugeMetricFamily(
            "external_mcp_health_next_check_timestamp_seconds",
            "Unix time at which the most overdue enabled server was due for its next health check."),
    }


class HealthFactsCollector(Collector):
    """Reads the servers' stored health facts at each scrape (one query)."""

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        try:
            servers = list(ExternalMcpServer.objects.only(
                "id", "status", "enabled", "last_checked_at", "created_at", "check_interval_seconds",
                "next_check_at"))
        except DatabaseError:
            logger.warning("health metrics: the database cannot be read", exc_info=True)
            return []
        now = timezone.now()
        families = _families()
        counts: Counter[str] = Counter()
        monitored = [s for s in servers if s.enabled and s.status != ServerStatus.DISABLED]
        monitored_ids = {s.pk for s in monitored}
        for server in servers:
            shown = staleness.shown_status(server, now)
            counts[shown] += 1
            if shown in AVAILABILITY_VALUE and server.pk in monitored_ids:
                families["availability"].add_metric([str(server.pk)], AVAILABILITY_VALUE[ServerStatus(shown)])
        for status in ServerStatus.values:
            families["servers"].add_metric([status], counts[status])
        if monitored:
            checked = [s.last_checked_at for s in monitored if s.last_checked_at]
            last = max(checked) if checked else min(s.created_at for s in monitored)
            families["last_check"].add_metric([], last.timestamp())
            families["next_check"].add_metric([], min(s.next_check_at for s in monitored).timestamp())
        return list(families.values())
