"""Retention: old raw events go in bounded batches, aggregates stay, unfinalised days are never touched."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.test_usage_aggregation import at, ev, make_server, store
from usage import aggregation, alerts, retention, tasks
from usage.models import AlertBreach, AlertKind, QuotaCounter, UsageDaily, UsageDayState, UsageEvent

TODAY = date(2026, 11, 24)
NOW = at(TODAY, 3)


@pytest.fixture(autouse=True)
def _retention(settings):
    settings.EXTERNAL_MCP_USAGE_RETENTION_DAYS = 10
    settings.USAGE_QUOTA_COUNTER_KEEP_DAYS = 3


@pytest.fixture
def server(admin):
    return make_server(admin)


def old(days_ago: int) -> date:
    return TODAY - timedelta(days=days_ago)


def test_old_finalised_days_are_purged_and_their_aggregates_kept(admin, server):
    store(*(ev(at(old(n), h), admin, server) for n in (15, 12, 11, 10, 2) for h in (1, 2)))
    aggregation.run_scheduled(NOW)
    result = retention.purge(NOW)
    assert (result.cutoff, result.boundary, result.events_deleted) == (old(10), old(10), 6)
    remaining = sorted({e.created_at.date() for e in UsageEvent.objects.all()})
    assert remaining == [old(10), old(2)]
    assert UsageDaily.objects.filter(day=old(15)).get().requests == 2  # aggregates are kept
    purged = set(UsageDayState.objects.filter(raw_purged_at__isnull=False).values_list("day", flat=True))
    assert {old(15), old(12), old(11)} <= purged and old(10) not in purged

    # Purged days are never recomputed from (now missing) raw events.
    aggregation.aggregate_days(old(15), old(11), now=NOW)
    assert UsageDaily.objects.get(day=old(15)).requests == 2


def test_retention_never_touches_an_unfinalised_day(admin, server):
    store(*(ev(at(old(n)), admin, server) for n in (20, 19, 18, 17)))
    aggregation.aggregate_day(old(20), final=True)
    aggregation.aggregate_day(old(18), final=True)
    # old(19) was never finalised (the aggregation job was down): it and everything after it stay.
    result = retention.purge(NOW)
    assert result.boundary == old(19) and result.events_deleted == 1
    assert sorted(e.created_at.date() for e in UsageEvent.objects.all()) == [old(19), old(18), old(17)]
    assert UsageDayState.objects.get(day=old(18)).raw_purged_at is None

    aggregation.run_scheduled(NOW)
    assert retention.purge(NOW).events_deleted == 3
    assert not UsageEvent.objects.exists()
    assert UsageDaily.objects.filter(day__lte=old(17)).count() == 4


def test_partial_day_blocks_retention(admin, server):
    store(ev(at(old(30)), admin, server))
    aggregation.aggregate_day(old(30), final=False)
    assert retention.purge(NOW).events_deleted == 0
    assert UsageEvent.objects.count() == 1


def test_deletes_go_in_bounded_batches(admin, server):
    store(*(ev(at(old(12), 0, i), admin, server) for i in range(10)))
    aggregation.run_scheduled(NOW)
    with CaptureQueriesContext(connection) as queries:
        result = retention.purge(NOW, batch_size=3)
    deletes = [q["sql"] for q in queries.captured_queries
               if q["sql"].startswith("DELETE") and "usage_logs" in q["sql"]]
    assert result.events_deleted == 10
    assert len(deletes) == 4  # 3 + 3 + 3 + 1
    sizes = [len(re.search(r"IN \(([^)]*)\)", q).group(1).split(",")) for q in deletes]
    assert sizes == [3, 3, 3, 1]


def test_old_quota_counters_are_deleted(admin, member):
    QuotaCounter.objects.bulk_create([
        QuotaCounter(user=admin.user, day=old(n), used=5) for n in (0, 1, 3, 4, 9)
    ] + [QuotaCounter(user=member.user, day=old(0), used=1)])
    result = retention.purge(NOW)
    assert result.counters_deleted == 2
    assert sorted(QuotaCounter.objects.filter(user=admin.user).values_list("day", flat=True)) == [
        old(3), old(1), old(0)]


def test_alert_breaches_older_than_the_retention_go(admin):
    rule = alerts.alert_rule_create(workspace=admin.workspace, actor=admin.user, kind=AlertKind.QUOTA_REJECTION)
    for days_ago in (11, 10, 9):
        AlertBreach.objects.create(rule=rule, subject=str(admin.user.pk), window_start=at(old(days_ago), 0),
                                   value=1, detected_at=at(old(days_ago), 23))
    result = retention.purge(NOW)
    assert result.breaches_deleted == 1 and "1 alert breaches" in str(result)
    assert sorted(AlertBreach.objects.values_list("window_start", flat=True)) == [at(old(10), 0), at(old(9), 0)]


def test_nothing_to_purge(db):
    result = retention.purge(NOW)
    assert (result.events_deleted, result.counters_deleted, result.breaches_deleted, result.batches) == (0, 0, 0, 0)
    assert "deleted 0 usage events" in str(result)


def test_the_beat_task_purges(admin, server, settings):
    settings.EXTERNAL_MCP_USAGE_RETENTION_DAYS = 0
    store(ev(at(old(400)), admin, server))
    aggregation.aggregate_day(old(400), final=True)
    assert "deleted 1 usage events" in tasks.purge_usage()
