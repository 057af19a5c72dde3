"""Billing and analytics hooks: code that receives each finalised day's aggregates.

Interface
---------
A hook is any object with a ``handle_day(day, rows)`` method (``BillingHook`` below):

* ``day`` — the UTC ``datetime.date`` just finalised;
* ``rows`` — a lazy ``QuerySet[UsageDaily]`` of that day's buckets, one per (workspace, user,
  server, tool), with ``requests``, ``counted``, ``errors``, ``quota_rejections``, ``blocked``,
  ``timeouts``, ``upstream_errors``, ``client_disconnects``, ``tokens_in``/``tokens_out``,
  ``bytes_in``/``bytes_out`` and latency figures. Iterate it with ``.iterator()`` or aggregate it
  in SQL; do not load it whole if days can be large.

``settings.USAGE_BILLING_HOOKS`` lists the hooks as dotted paths (environment variable, comma
separated; default: ``usage.billing.BillingRecordHook``). A path may name a class (instantiated
once, without arguments), an instance, or a plain function ``f(day, rows)``.

Contract
--------
Hooks run inside the transaction that finalises the day (``usage.aggregation.aggregate_day``):
if one raises, the day's aggregates and state roll back and the whole day is redone on the next
run. So a hook **must be idempotent** — it may be called again for the same day (a retried run,
or an operator re-running ``manage.py aggregate_usage --day``) and must then converge to the same
result, e.g. by upserting on a natural key. A hook that talks to an external system should only
enqueue work (a Celery task started with ``transaction.on_commit``) so a slow or failing remote
never holds the transaction open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date
from typing import Any, Protocol, runtime_checkable

from django.conf import settings
from django.db.models import QuerySet, Sum
from django.utils import timezone
from django.utils.module_loading import import_string

from usage.models import BillingRecord, UsageDaily

DEFAULT_HOOKS = ["usage.billing.BillingRecordHook"]


@runtime_checkable
class BillingHook(Protocol):
    def handle_day(self, day: date, rows: QuerySet[UsageDaily]) -> None:
        """Receive the buckets of a day that was just finalised. Must be idempotent."""


class _FunctionHook:
    def __init__(self, function: Callable[[date, QuerySet[UsageDaily]], Any]) -> None:
        self.function = function

    def handle_day(self, day: date, rows: QuerySet[UsageDaily]) -> None:
        self.function(day, rows)


_cache: dict[tuple[str, ...], list[BillingHook]] = {}
_cache_lock = threading.Lock()


def load_hook(path: str) -> BillingHook:
    target = import_string(path)
    if isinstance(target, type):
        target = target()
    if isinstance(target, BillingHook):
        return target
    if callable(target):
        return _FunctionHook(target)
    raise TypeError(f"USAGE_BILLING_HOOKS: {path} is neither a hook (handle_day(day, rows)) nor a function")


def get_hooks() -> list[BillingHook]:
    paths = tuple(getattr(settings, "USAGE_BILLING_HOOKS", DEFAULT_HOOKS))
    hooks = _cache.get(paths)
    if hooks is None:
        with _cache_lock:
            hooks = _cache[paths] = [load_hook(path) for path in paths]
    return hooks


def run_hooks(day: date, rows: QuerySet[UsageDaily]) -> None:
    for hook in get_hooks():
        hook.handle_day(day, rows)


class BillingRecordHook:
    """The built-in hook: one ``BillingRecord`` per (day, workspace, user) with the day's requests,
    counted uses and tokens. Upserts on that key (``INSERT … ON CONFLICT DO UPDATE``) and removes
    the day's records that no longer have usage, so any number of calls leaves the same rows."""

    def handle_day(self, day: date, rows: QuerySet[UsageDaily]) -> None:
        now = timezone.now()
        per_user = (
            rows.order_by()
            .filter(workspace_id__isnull=False, user_id__isnull=False)  # nobody to bill otherwise
            .values("workspace_id", "user_id")
            .annotate(n_requests=Sum("requests"), n_counted=Sum("counted"), n_tokens_in=Sum("tokens_in"),
                      n_tokens_out=Sum("tokens_out"))
        )
        records = [
            BillingRecord(day=day, workspace_id=r["workspace_id"], user_id=r["user_id"], requests=r["n_requests"],
                          counted=r["n_counted"], tokens_in=r["n_tokens_in"], tokens_out=r["n_tokens_out"],
                          computed_at=now)
            for r in per_user
        ]
        if records:
            BillingRecord.objects.bulk_create(
                records, batch_size=1000, update_conflicts=True, unique_fields=["day", "workspace", "user"],
                update_fields=["requests", "counted", "tokens_in", "tokens_out", "computed_at"],
            )
        keep = {(r.workspace_id, r.user_id) for r in records}
        stale = [pk for pk, ws, user in BillingRecord.objects.filter(day=day).values_list("pk", "workspace_id",
                                                                                           "user_id")
                 if (ws, user) not in keep]
        if stale:
            BillingRecord.objects.filter(pk__in=stale).delete()
