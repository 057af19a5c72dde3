"""The quota page (/usage/quota/) and its API twin: each member's plan, today's use from the live
counters on either backend, the reset time, and who the quota refused over the period; admins see
their workspace, members only themselves, outsiders nothing; a constant number of queries."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest
import redis
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.conftest import make_actor
from tests.test_usage_aggregation import at, ev, make_server, store
from twinmcp import services as core
from twinmcp.models import Role
from usage import aggregation
from usage.limiter import get_limiter

PAGE = "/usage/quota/"
API = "/api/v1/usage/quota/members"
TODAY = date(2026, 11, 21)
D1 = date(2026, 11, 18)
NOW = datetime(2026, 11, 21, 7, 0, tzinfo=UTC)  # 17 h until the reset


@pytest.fixture(autouse=True)
def _frozen(settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 5
    if settings.REDIS_URL:  # counters an earlier run left on the same frozen day
        client = redis.Redis.from_url(settings.REDIS_URL)
        for key in client.scan_iter(f"twinmcp:quota:*:{TODAY.isoformat()}"):
            client.delete(key)
        client.close()
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def refused(admin, member, outsider, flag_on):
    """bob was refused 3 times on D1 (aggregated) and once today (raw); eve, elsewhere, twice."""
    server, foreign = make_server(admin, "s1"), make_server(outsider, "s3")
    store(*[ev(at(D1, 9, i), member, server, outcome="quota") for i in range(3)],
          ev(at(D1, 10), admin, server), *[ev(at(D1, 9, i), outsider, foreign, outcome="quota") for i in range(2)])
    aggregation.run_scheduled(NOW)
    store(ev(at(TODAY, 6, 59), member, server, outcome="quota"))


def rows(page: str) -> dict[str, str]:
    """username -> the row's text, whitespace collapsed."""
    found = {}
    for row in re.findall(r'<tr data-user-id="\d+".*?</tr>', page, flags=re.S):
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip()
        found[text.split(" ")[0]] = text
    return found


def test_admin_sees_every_member_with_live_use_and_refusals(admin_web, admin, member, refused):
    core.profile_set_plan(user=admin.user, code="pro")
    get_limiter().consume(member.user.pk, 5, 2)
    get_limiter().consume(admin.user.pk, None, 9)
    response = admin_web.get(PAGE)
    assert response.status_code == 200
    page = response.content.decode()
    shown = rows(page)
    assert set(shown) == {"alice", "bob"}
    assert "Free 2 / 5 3" in shown["bob"] and shown["bob"].endswith("00:00 UTC 4")  # 3 on D1 + 1 today
    assert "Pro 9 Unlimited" in shown["alice"] and shown["alice"].endswith(" 0")
    assert "Sun 22 Nov, 00:00 UTC" in page and "(in 17 h)" in page
    assert f'href="/usage/?start=2026-10-23&amp;end=2026-11-21&amp;group_by=tool&amp;user={member.user.pk}"' in page
    assert "4 calls refused by the quota in the period" in page


def test_the_counters_are_read_on_the_database_backend_too(admin_web, member, refused, settings):
    settings.REDIS_URL = ""
    get_limiter().consume(member.user.pk, 5, 5)
    shown = rows(admin_web.get(PAGE).content.decode())
    assert "Free 5 / 5 0 limit reached" in shown["bob"]


def test_redis_counter_missing_falls_back_to_committed_events(admin_web, admin, member, flag_on, settings):
    """No counter yet today (or Redis restarted empty): the committed uses are what is charged."""
    server = make_server(admin, "s1")
    store(*[ev(at(TODAY, 6, i), member, server) for i in range(3)])
    assert "Free 3 / 5 2" in rows(admin_web.get(PAGE).content.decode())["bob"]


def test_period_limits_the_refusals(admin_web, refused):
    shown = rows(admin_web.get(PAGE, {"start": "2026-11-20", "end": "2026-11-21"}).content.decode())
    assert shown["bob"].endswith(" 1")


def test_member_sees_only_themself(member_web, member, refused):
    page = member_web.get(PAGE).content.decode()
    assert set(rows(page)) == {"bob"}
    assert f"user={member.user.pk}" not in page  # their usage link needs no user filter


def test_outsider_sees_nothing_of_the_workspace(outsider_web, admin, refused):
    assert outsider_web.get(PAGE, {"workspace": str(admin.workspace.pk)}).status_code == 404
    page = outsider_web.get(PAGE).content.decode()
    assert set(rows(page)) == {"eve"} and "alice" not in page.split("<main")[1] and "bob" not in page


def test_htmx_gets_the_table_alone(admin_web, refused):
    page = admin_web.get(PAGE, HTTP_HX_REQUEST="true").content.decode()
    assert 'id="quota-members"' in page and "<html" not in page


def test_query_count_does_not_grow_with_members(admin_web, admin, refused, django_user_model):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert admin_web.get(PAGE).status_code == 200
        return len(ctx.captured_queries)

    admin_web.get(PAGE)  # warm the session and flag caches
    few = count()
    for i in range(8):
        actor = make_actor(django_user_model, f"user{i}", admin.workspace, Role.MEMBER)
        core.profile_ensure(user=actor.user)
        get_limiter().consume(actor.user.pk, 5)
    assert count() == few


def test_api_answers_the_same_and_keeps_tenants_apart(admin, member, outsider, refused):
    get_limiter().consume(member.user.pk, 5, 2)
    body = admin.client().get(API).json()
    bob = next(row for row in body["results"] if row["username"] == "bob")
    assert body["workspace"] == "acme" and {row["username"] for row in body["results"]} == {"alice", "bob"}
    assert bob == {"user_id": member.user.pk, "username": "bob", "role": "member", "plan": "free", "limit": 5,
                   "used": 2, "remaining": 3, "reset_at": "2026-11-22T00:00:00Z", "quota_rejections": 4}
    assert [row["username"] for row in member.client().get(API).json()["results"]] == ["bob"]
    foreign = outsider.client().get(API, {"workspace": "acme"})
    assert foreign.status_code == 400 and "workspace" in foreign.json()
    bad = admin.client().get(API, {"start": "2024-01-01", "end": "2026-11-21"})
    assert bad.status_code == 400 and "start" in bad.json()


def test_page_and_api_need_a_login(client, db):
    assert client.get(PAGE).status_code == 302
    assert client.get(API).status_code in (401, 403)


def test_peek_many_reads_committed_uses_when_redis_is_down(admin, member, flag_on):
    """Redis unreachable: the board still shows what the durable truth says was charged today."""
    from usage import limiter as limiter_module
    from usage.limiter import UsageLimiter
    from usage.quota import DATABASE

    server = make_server(admin, "s1")
    store(*[ev(at(TODAY, 6, i), member, server) for i in range(2)])
    limiter = UsageLimiter("redis://127.0.0.1:1/0")
    try:
        decisions = limiter.peek_many({member.user.pk: 5, admin.user.pk: None})
    finally:
        limiter.close()
        limiter_module._set_unavailable(False)  # the process-wide gauge the failure raised (as test_limiter does)
    assert (decisions[member.user.pk].used, decisions[member.user.pk].remaining) == (2, 3)
    assert decisions[member.user.pk].backend == DATABASE
    assert (decisions[admin.user.pk].used, decisions[admin.user.pk].remaining) == (0, None)
