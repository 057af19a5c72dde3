"""Celery tasks of the usage app (scheduled by beat, see CELERY_BEAT_SCHEDULE): take no ids,
call the service modules."""

from __future__ import annotations

from celery import shared_task

from usage import aggregation, alerts, delivery, retention


@shared_task(ignore_result=True)
def aggregate_usage() -> list[str]:
    """Every USAGE_AGGREGATE_EVERY_SECONDS: finalise finished days (missed ones too), refresh today."""
    return [str(result) for result in aggregation.run_scheduled()]


@shared_task(ignore_result=True)
def purge_usage() -> str:
    """Daily: delete raw events past EXTERNAL_MCP_USAGE_RETENTION_DAYS (finalised days only)."""
    return str(retention.purge())


@shared_task(ignore_result=True)
def evaluate_usage_alerts() -> int:
    """Every minute: notify the admins of each new breach of an enabled usage alert rule, once."""
    return alerts.alerts_evaluate()


@shared_task(ignore_result=True)
def deliver_usage_exports() -> list[str]:
    """Every USAGE_EXPORT_EVERY_SECONDS: deliver each due finalised day to each export destination."""
    return [str(result) for result in delivery.run_scheduled()]
