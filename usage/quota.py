"""What a daily-quota decision is, for the limiter, its stores and their callers: the decision,
the refusal to decide, and the UTC day it counts on (``usage/limiter.py`` makes decisions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time

from django.conf import settings

REDIS = "redis"
DATABASE = "database"
UNCOUNTED = ""  # an uncapped call let through while Redis could not count it: nothing to refund

# How long after a call's upstream timeout its usage event is surely committed.
SETTLE_SECONDS = 5


class QuotaUnavailable(Exception):
    """The quota cannot be decided now: the caller must refuse the call (503 + Retry-After),
    never let it through uncounted."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The outcome of one quota check, with what a 429 response or a usage badge needs."""

    allowed: bool
    limit: int | None  # None = uncapped
    used: int  # after this call if allowed; current usage if refused (or peeked)
    remaining: int | None  # None when uncapped
    reset_at: datetime  # next 00:00 UTC (aware, UTC)
    backend: str  # REDIS, DATABASE, or UNCOUNTED: which store counted this call
    ticket: str = ""  # the Redis ticket a refund names

    @property
    def retry_after(self) -> int:
        """Whole seconds from now until ``reset_at`` (at least 1): a Retry-After header value."""
        return max(1, math.ceil((self.reset_at - datetime.now(UTC)).total_seconds()))

    @property
    def day(self) -> date:
        """The UTC day whose counter this decision counted on (a refund after midnight goes there)."""
        return (self.reset_at - timedelta(days=1)).date()


def utc(now: datetime | None) -> datetime:
    """``now`` as an aware UTC datetime; a naive value is taken to be UTC already."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def next_reset(now: datetime | None = None) -> datetime:
    """The next 00:00 UTC after ``now`` (default: the current time): when daily counters reset."""
    return datetime.combine(utc(now).date() + timedelta(days=1), dt_time.min, tzinfo=UTC)


def settle_seconds() -> int:
    """How long calls admitted before a Redis reset may still be running, plus their commit."""
    return math.ceil(settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS / 1000) + SETTLE_SECONDS


def make_decision(*, allowed: bool, limit: int | None, used: int, now: datetime, backend: str,
                  ticket: str = "") -> QuotaDecision:
    remaining = None if limit is None else max(limit - used, 0)
    return QuotaDecision(allowed, limit, used, remaining, next_reset(now), backend, ticket)


def peek_decision(limit: int | None, used: int, now: datetime, backend: str) -> QuotaDecision:
    return make_decision(allowed=limit is None or used < limit, limit=limit, used=used, now=now, backend=backend)
