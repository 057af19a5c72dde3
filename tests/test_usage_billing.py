"""The billing hook: called once a day is final, idempotent, pluggable through USAGE_BILLING_HOOKS."""

from __future__ import annotations

from datetime import date

import pytest

from tests.test_usage_aggregation import D1, D2, at, ev, later, make_server, store
from usage import aggregation, billing
from usage.models import BillingRecord, UsageDaily


@pytest.fixture
def server(admin):
    return make_server(admin)


@pytest.fixture
def two_days(admin, member, server):
    store(
        ev(at(D1, 1), admin, server, tokens_in=10, tokens_out=20),
        ev(at(D1, 2), admin, server, tool="other", tokens_in=1, tokens_out=2),
        ev(at(D1, 3), admin, server, method="tools/list", tool="", tokens_in=5, tokens_out=5),
        ev(at(D1, 4), member, server, outcome="quota", tokens_in=0, tokens_out=0),
        ev(at(D2, 1), member, server, tokens_in=3, tokens_out=4),
    )


def records() -> list[tuple]:
    return list(BillingRecord.objects.order_by("day", "user_id").values_list(
        "day", "workspace_id", "user_id", "requests", "counted", "tokens_in", "tokens_out"))


def test_finalising_a_day_writes_billing_records(two_days, admin, member):
    aggregation.aggregate_days(D1, D2, now=later(D2))
    ws = admin.workspace.pk
    assert records() == [
        (D1, ws, admin.user.pk, 3, 2, 16, 27),
        (D1, ws, member.user.pk, 1, 0, 0, 0),
        (D2, ws, member.user.pk, 1, 1, 3, 4),
    ]


def test_billing_records_are_idempotent(two_days, admin):
    aggregation.aggregate_days(D1, D2, now=later(D2))
    first = list(BillingRecord.objects.order_by("pk").values_list("pk", "day", "user_id", "requests", "counted"))
    aggregation.aggregate_days(D1, D2, now=later(D2))
    aggregation.run_scheduled(later(D2))
    billing.BillingRecordHook().handle_day(D1, UsageDaily.objects.filter(day=D1))
    again = list(BillingRecord.objects.order_by("pk").values_list("pk", "day", "user_id", "requests", "counted"))
    assert again == first  # same rows, updated in place


def test_records_without_usage_any_more_are_removed(two_days, member):
    aggregation.aggregate_day(D1, final=True)
    assert BillingRecord.objects.filter(day=D1).count() == 2
    billing.BillingRecordHook().handle_day(D1, UsageDaily.objects.filter(day=D1, user_id=member.user.pk))
    assert list(BillingRecord.objects.filter(day=D1).values_list("user_id", flat=True)) == [member.user.pk]


def test_partial_days_are_not_billed(two_days):
    aggregation.aggregate_day(D1, final=False)
    assert not BillingRecord.objects.exists()


calls: list[tuple[date, int]] = []


class CountingHook:
    def handle_day(self, day, rows):
        calls.append((day, sum(row.requests for row in rows.iterator())))


def function_hook(day, rows):
    calls.append((day, -rows.count()))


def test_custom_hooks_from_settings_receive_each_finalised_day(two_days, settings):
    calls.clear()
    settings.USAGE_BILLING_HOOKS = ["tests.test_usage_billing.CountingHook", "tests.test_usage_billing.function_hook"]
    aggregation.aggregate_days(D1, D2, now=later(D2))
    assert calls == [(D1, 4), (D1, -4), (D2, 1), (D2, -1)]
    assert not BillingRecord.objects.exists()  # the default hook is not configured here


def test_a_bad_hook_path_fails_loudly(settings):
    settings.USAGE_BILLING_HOOKS = ["usage.billing.DEFAULT_HOOKS"]
    with pytest.raises(TypeError, match="neither a hook"):
        billing.get_hooks()


def test_the_default_hook_satisfies_the_protocol():
    assert isinstance(billing.BillingRecordHook(), billing.BillingHook)
    assert billing.DEFAULT_HOOKS == ["usage.billing.BillingRecordHook"]
