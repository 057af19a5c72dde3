"""Usage export metrics computed from the database when /metrics is scraped.

Deliveries run in Celery workers, a few times an hour: an in-process gauge would say nothing
between runs, and nothing at all once the workers stop. So, like the health facts, these are read
from the stored delivery records at each scrape (``usage.delivery.destinations_status``), one
series per enabled destination (operators name a handful, so the label stays bounded):

- ``external_mcp_usage_export_lag_days``: days from the oldest day still to deliver to today; 1 while
  yesterday waits for finalisation and delivery, 0 when up to date. The alert
  ``ExternalMCPUsageExportBehind`` fires above 1.
- ``external_mcp_usage_export_failing_days``: days whose last attempt failed (retried with backoff).
- ``external_mcp_usage_export_failures_total``: failed attempts, ever.
- ``external_mcp_usage_export_last_delivery_timestamp_seconds``: the newest successful delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import DatabaseError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from usage.delivery import destinations_status

logger = logging.getLogger(__name__)


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    return {
        "lag": GaugeMetricFamily(
            "external_mcp_usage_export_lag_days",
            "Days from the oldest usage day not yet delivered to this destination to today (0: up to date).",
            labels=["destination"]),
        "failing": GaugeMetricFamily(
            "external_mcp_usage_export_failing_days", "Usage days whose last delivery attempt failed.",
            labels=["destination"]),
        "failures": CounterMetricFamily(
            "external_mcp_usage_export_failures", "Failed usage delivery attempts.", labels=["destination"]),
        "last": GaugeMetricFamily(
            "external_mcp_usage_export_last_delivery_timestamp_seconds",
            "Unix time of the newest successful usage delivery to this destination.", labels=["destination"]),
    }


class UsageExportCollector(Collector):
    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        try:
            statuses = [s for s in destinations_status() if s.destination.enabled]
        except DatabaseError:
            logger.warning("usage export metrics: the database cannot be read", exc_info=True)
            return []
        families = _families()
        for status in statuses:
            label = [status.destination.name]
            families["lag"].add_metric(label, status.lag_days)
            families["failing"].add_metric(label, status.failing_days)
            families["failures"].add_metric(label, status.failures)
            if status.last_delivered_at is not None:
                families["last"].add_metric(label, status.last_delivered_at.timestamp())
        return list(families.values())
