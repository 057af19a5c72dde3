"""Read-side query pieces for usage: bucket expressions, the p95 aggregate, and ``UsageQuery``,
which answers the usage API and the exports from the daily aggregates (finalised days) plus the
raw events (days not finalised yet, e.g. today) in one SQL statement.

Portable: PostgreSQL in production and tests, SQLite in ``make run``. On SQLite the p95 is a
Python aggregate function registered on the connection (``usage_p95``), computed the same way as
PostgreSQL's ``percentile_cont(0.95)`` (linear interpolation between the two closest ranks).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.db.models import (
    Aggregate,
    Avg,
    Case,
    CharField,
    Count,
    DateTimeField,
    F,
    FloatField,
    Max,
    Min,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Round, TruncDate
from django.utils.dateparse import parse_date, parse_datetime

from usage.models import ERROR_OUTCOMES, Outcome, UsageDaily, UsageDayState, UsageEvent

GROUP_DIMENSIONS = ("day", "user", "server", "tool")
DIMENSION_COLUMN = {"day": "day", "user": "user_id", "server": "server_id", "tool": "tool"}

# The columns of one bucket, in order: UsageDaily rows and grouped raw events both produce them.
BUCKET_COLUMNS = (
    "day", "workspace_id", "user_id", "server_id", "tool", "requests", "counted", "errors", "quota_rejections",
    "blocked", "timeouts", "upstream_errors", "client_disconnects", "tokens_in", "tokens_out", "bytes_in",
    "bytes_out", "latency_sum_ms", "latency_p95_ms", "first_at", "last_at",
)
# Outcome counts added after the first columns: kept at the end of SUMMED, so that exports can
# keep their historical column order and append these.
OUTCOME_COUNTS = ("timeouts", "upstream_errors", "client_disconnects")
SUMMED = ("requests", "counted", "errors", "quota_rejections", "blocked", "tokens_in", "tokens_out", "bytes_in",
          "bytes_out", *OUTCOME_COUNTS)


# -- p95 -------------------------------------------------------------------------------------------


def percentile_cont(values: Sequence[float], fraction: float = 0.95) -> float | None:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


class _SqliteP95:
    """``usage_p95(x)`` for SQLite (the Python fallback of ``percentile_cont(0.95)``)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def step(self, value: float | None) -> None:
        if value is not None:
            self.values.append(float(value))

    def finalize(self) -> float | None:
        return percentile_cont(self.values)


def _register_sqlite_functions(conn: Any) -> None:
    conn.ensure_connection()
    conn.connection.create_aggregate("usage_p95", 1, _SqliteP95)


class Percentile95(Aggregate):
    """The 95th percentile of an expression (continuous, interpolated)."""

    function = "percentile_cont"
    name = "Percentile95"
    output_field = FloatField()
    allow_distinct = False

    def as_postgresql(self, compiler: Any, conn: Any, **extra: Any) -> tuple[str, list[Any]]:
        return super().as_sql(compiler, conn, template="percentile_cont(0.95) WITHIN GROUP (ORDER BY %(expressions)s)",
                              **extra)

    def as_sqlite(self, compiler: Any, conn: Any, **extra: Any) -> tuple[str, list[Any]]:
        _register_sqlite_functions(conn)
        return super().as_sql(compiler, conn, function="usage_p95", **extra)


# -- buckets ---------------------------------------------------------------------------------------

# "" for every method but tools/call (the proxy writes "" already; this keeps the rule in one place).
TOOL_EXPRESSION = Case(When(method="tools/call", then=F("tool_name")), default=Value(""), output_field=CharField())


def event_buckets(events: QuerySet[UsageEvent], *, with_avg: bool = False, with_p95: bool = True) -> QuerySet:
    """Raw events grouped into (UTC day, workspace, user, server, tool) buckets, as a values_list
    in ``BUCKET_COLUMNS`` order (with ``latency_avg_ms`` after ``latency_sum_ms`` when ``with_avg``,
    the ``UsageDaily`` column order). Latencies are rounded to 3 decimals (the proxy's resolution),
    so re-running gives identical values whatever order the database adds them up in."""
    grouped = (
        events.order_by()
        .annotate(b_day=TruncDate("created_at", tzinfo=UTC), b_tool=TOOL_EXPRESSION)
        .values("b_day", "workspace_id", "user_id", "server_id", "b_tool")
    )
    aggregates: dict[str, Any] = {
        "b_requests": Count("id"),
        "b_counted": Count("id", filter=Q(counted=True)),
        "b_errors": Count("id", filter=Q(outcome__in=ERROR_OUTCOMES)),
        "b_quota": Count("id", filter=Q(outcome=Outcome.QUOTA)),
        "b_blocked": Count("id", filter=Q(outcome=Outcome.BLOCKED)),
        "b_timeouts": Count("id", filter=Q(outcome=Outcome.TIMEOUT)),
        "b_upstream_errors": Count("id", filter=Q(outcome=Outcome.UPSTREAM_ERROR)),
        "b_client_disconnects": Count("id", filter=Q(outcome=Outcome.CLIENT_DISCONNECT)),
        "b_tokens_in": Sum("tokens_in"),
        "b_tokens_out": Sum("tokens_out"),
        "b_bytes_in": Sum("bytes_in"),
        "b_bytes_out": Sum("bytes_out"),
        "b_latency_sum": Round(Sum("latency_ms"), 3),
    }
    if with_avg:
        aggregates["b_latency_avg"] = Round(Avg("latency_ms"), 3)
    aggregates["b_latency_p95"] = (
        Round(Percentile95("latency_ms"), 3) if with_p95 else Value(None, output_field=FloatField())
    )
    aggregates["b_first"] = Min("created_at")
    aggregates["b_last"] = Max("created_at")
    return grouped.annotate(**aggregates).values_list(
        "b_day", "workspace_id", "user_id", "server_id", "b_tool", *aggregates
    )


def daily_buckets(rows: QuerySet[UsageDaily]) -> QuerySet:
    """Stored aggregates as a values_list in ``BUCKET_COLUMNS`` order."""
    return rows.order_by().values_list(*BUCKET_COLUMNS)


# -- day helpers -----------------------------------------------------------------------------------


def midnight(day: date) -> datetime:
    return datetime.combine(day, dt_time.min, tzinfo=UTC)


def range_start(end: date, days: int) -> date:
    """The first of the ``days`` days ending on ``end``, never before the first day a date can hold."""
    span = timedelta(days=days - 1)
    return end - span if end - date.min >= span else date.min


def days_between(first: date, last: date) -> Iterator[date]:
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def runs(days: Sequence[date]) -> list[tuple[date, date]]:
    """Sorted days as inclusive runs of consecutive days: [d1, d2, d3, d7] → [(d1, d3), (d7, d7)]."""
    result: list[tuple[date, date]] = []
    for day in sorted(days):
        if result and result[-1][1] + timedelta(days=1) == day:
            result[-1] = (result[-1][0], day)
        else:
            result.append((day, day))
    return result


def settled_days(first: date, last: date) -> set[date]:
    """Days in [first, last] whose aggregates are final (a day whose raw events were purged is
    final by construction): the days the usage API reads from ``UsageDaily``."""
    return set(
        UsageDayState.objects.filter(day__gte=first, day__lte=last).settled().values_list("day", flat=True)
    )


# -- normalising raw SQL values (SQLite returns text for dates, Decimal sums on PostgreSQL) ------


def as_int(value: Any) -> int:
    return int(value or 0)


def as_float(value: Any) -> float | None:
    if value is None:
        return None
    return round(float(value), 3)


def as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, datetime):
        return value.date()
    return parse_date(str(value)[:10])


def as_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = parse_datetime(str(value))
        if value is None:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def as_uuid(value: Any) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(str(value))


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


# -- the grouped usage query -----------------------------------------------------------------------


@dataclass(frozen=True)
class UsageQuery:
    """What the caller may see (``scope``: a Q over ``workspace_id``/``user_id``), the filters and
    the grouping. Rows are always per workspace plus the requested dimensions."""

    start: date
    end: date
    today: date
    scope: Q
    group_by: tuple[str, ...] = ("day",)
    user_id: int | None = None
    server_id: uuid.UUID | None = None
    tool: str | None = None

    # -- SQL ---------------------------------------------------------------------------------------

    def filters(self, *, raw: bool) -> Q:
        q = self.scope
        if self.user_id is not None:
            q &= Q(user_id=self.user_id)
        if self.server_id is not None:
            q &= Q(server_id=self.server_id)
        if self.tool:
            q &= Q(method="tools/call", tool_name=self.tool) if raw else Q(tool=self.tool)
        return q

    def bucket_parts(self) -> list[QuerySet]:
        """The querysets whose UNION ALL gives every bucket in range, run as one SQL statement (one
        snapshot, so no event is counted twice or missed while the aggregation job runs):

        * the stored buckets of every day in range — final days whole, open days (today) up to
          their ``covered_until`` — plus, for each open day, its raw events from ``covered_until``
          on (read inside the statement, so a fill or finalisation committed meanwhile is seen
          consistently by both halves);
        * per-bucket queries (group_by day, user, server and tool) want exact p95s instead, so
          they read open days wholly from raw events and only final days from the buckets."""
        last = min(self.end, self.today + timedelta(days=1))  # nothing is recorded beyond tomorrow
        if last < self.start:
            return []
        settled = settled_days(self.start, last)
        open_days = [day for day in days_between(self.start, last) if day not in settled]
        stored = UsageDaily.objects.filter(self.filters(raw=False))
        parts: list[QuerySet] = []
        if not self.per_bucket:
            parts.append(daily_buckets(stored.filter(day__gte=self.start, day__lte=last)))
            if open_days:
                tail = Q()
                for day in open_days:
                    covered = Subquery(UsageDayState.objects.filter(day=day).values("covered_until")[:1],
                                       output_field=DateTimeField())
                    tail |= Q(created_at__gte=Coalesce(covered, Value(midnight(day), output_field=DateTimeField())),
                              created_at__lt=midnight(day + timedelta(days=1)))
                events = UsageEvent.objects.filter(tail).filter(self.filters(raw=True))
                parts.append(event_buckets(events, with_p95=False))
            return parts
        if settled:
            in_days = Q()
            for first, final in runs(sorted(settled)):
                in_days |= Q(day__gte=first, day__lte=final)
            parts.append(daily_buckets(stored.filter(in_days)))
        if open_days:
            in_time = Q()
            for first, final in runs(open_days):
                in_time |= Q(created_at__gte=midnight(first), created_at__lt=midnight(final + timedelta(days=1)))
            events = UsageEvent.objects.filter(in_time).filter(self.filters(raw=True))
            parts.append(event_buckets(events, with_p95=True))
        return parts

    def _buckets_cte(self) -> tuple[str, list[Any]]:
        sqls, params = [], []
        for part in self.bucket_parts():
            try:
                sql, part_params = part.query.sql_with_params()
            except EmptyResultSet:  # e.g. a caller without any workspace: Django knows it matches nothing
                continue
            sqls.append(sql)
            params.extend(part_params)
        if not sqls:  # still a well-formed, empty CTE
            sql, params = daily_buckets(UsageDaily.objects.filter(day__lt=date.min)).query.sql_with_params()
            sqls = [sql]
        columns = ", ".join(BUCKET_COLUMNS)
        return f"WITH buckets ({columns}) AS ({' UNION ALL '.join(sqls)})", params

    @property
    def per_bucket(self) -> bool:
        """Grouped by all four dimensions: every row is one stored bucket, so it has a p95."""
        return set(self.group_by) == set(GROUP_DIMENSIONS)

    def _grouped(self) -> tuple[str, str, list[Any]]:
        """(WITH clause, grouped SELECT, params): one row per workspace and requested dimensions.

        Two hash-friendly steps instead of COUNT(DISTINCT tool), which would force a sort of every
        bucket: first per group *and tool*, then per group (counting the non-empty tools). p95 is
        only kept for per-bucket rows: percentiles of several buckets cannot be derived from theirs."""
        keys = ["workspace_id", *(DIMENSION_COLUMN[d] for d in self.group_by)]
        inner_keys = keys if "tool" in keys else [*keys, "tool"]
        cte, params = self._buckets_cte()
        inner_sums = ", ".join(f"SUM(b.{c}) AS {c}" for c in (*SUMMED, "latency_sum_ms"))
        inner = (
            f"SELECT {', '.join('b.' + k for k in inner_keys)}, {inner_sums}, "  # noqa: S608 - constant identifiers
            "MAX(b.latency_p95_ms) AS latency_p95_ms, MIN(b.first_at) AS first_at, MAX(b.last_at) AS last_at, "
            f"COUNT(*) AS buckets FROM buckets b GROUP BY {', '.join('b.' + k for k in inner_keys)}"
        )
        sums = ", ".join(f"SUM(t.{c}) AS {c}" for c in (*SUMMED, "latency_sum_ms"))
        p95 = "MAX(t.latency_p95_ms)" if self.per_bucket else "NULL"
        grouped = (
            f"SELECT {', '.join('t.' + k for k in keys)}, {sums}, {p95} AS latency_p95_ms, "  # noqa: S608
            "MIN(t.first_at) AS first_at, MAX(t.last_at) AS last_at, SUM(t.buckets) AS buckets, "
            "COUNT(CASE WHEN t.tool <> '' THEN 1 END) AS unique_tools "
            f"FROM ({inner}) t GROUP BY {', '.join('t.' + k for k in keys)}"
        )
        return cte, grouped, params

    def grouped_sql(self, *, window_totals: bool = False, limit: int | None = None, offset: int = 0,
                    pseudonymize: bool = False) -> tuple[str, list[Any]]:
        """The grouped rows with workspace slug, user and server names joined in (a server's name only
        within its own workspace), ordered by the requested dimensions; ``window_totals`` adds the
        group count and totals to every row."""
        qn = connection.ops.quote_name
        user_model = get_user_model()
        cte, grouped, params = self._grouped()
        select = ["g.*", "w.slug AS workspace_slug"]
        joins = [f"LEFT JOIN {qn(_meta_table('twinmcp', 'Workspace'))} w ON w.id = g.workspace_id"]
        order = []
        for dim in self.group_by:
            if dim == "day":
                order.append("g.day")
            elif dim == "user":
                if not pseudonymize:
                    username = qn(user_model.USERNAME_FIELD)
                    select += [f"u.{username} AS username", f"u.{qn(user_model.get_email_field_name())} AS email"]
                    joins.append(f"LEFT JOIN {qn(user_model._meta.db_table)} u ON u.id = g.user_id")
                    order.append(f"u.{username}")
                order.append("g.user_id")
            elif dim == "server":
                # Only a server of the row's own workspace lends its name: a row that names another
                # workspace's server (or a deleted one) shows its id alone, like an id that never existed.
                select.append("s.name AS server_name")
                joins.append(f"LEFT JOIN {qn(_meta_table('external_mcp', 'ExternalMcpServer'))} s "
                             "ON s.id = g.server_id AND s.workspace_id = g.workspace_id")
                order += ["s.name", "g.server_id"]
            else:
                order.append("g.tool")
        order += ["w.slug", "g.workspace_id"]
        if window_totals:
            select.append("COUNT(*) OVER () AS total_groups")
            select += [f"SUM(g.{c}) OVER () AS total_{c}" for c in (*SUMMED, "latency_sum_ms", "buckets")]
            select += ["MAX(g.latency_p95_ms) OVER () AS total_latency_p95_ms",
                       "MIN(g.first_at) OVER () AS total_first_at", "MAX(g.last_at) OVER () AS total_last_at"]
        sql = f"{cte} SELECT {', '.join(select)} FROM ({grouped}) g {' '.join(joins)} ORDER BY {', '.join(order)}"  # noqa: S608, E501
        if limit is not None:
            sql += " LIMIT %s OFFSET %s"
            params = [*params, limit, offset]
        return sql, params

    def totals_sql(self) -> tuple[str, list[Any]]:
        cte, grouped, params = self._grouped()
        sums = ", ".join(f"SUM(g.{c}) AS total_{c}" for c in (*SUMMED, "latency_sum_ms", "buckets"))
        sql = (
            f"{cte} SELECT COUNT(*) AS total_groups, {sums}, MAX(g.latency_p95_ms) AS total_latency_p95_ms, "  # noqa: S608
            f"MIN(g.first_at) AS total_first_at, MAX(g.last_at) AS total_last_at FROM ({grouped}) g"
        )
        return sql, params

    # -- execution ---------------------------------------------------------------------------------

    def page(self, *, limit: int, offset: int, pseudonymize: bool = False) -> tuple[list[dict], int, dict]:
        """One page of grouped rows, the number of groups and the totals over all of them, in one
        statement (window functions) — a second one only when the page is past the end."""
        sql, params = self.grouped_sql(window_totals=True, limit=limit, offset=offset, pseudonymize=pseudonymize)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            names = [c[0] for c in cursor.description]
            rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        if rows:
            totals_source = rows[0]
        else:
            sql, params = self.totals_sql()
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                names = [c[0] for c in cursor.description]
                totals_source = dict(zip(names, cursor.fetchone(), strict=True))
        return rows, as_int(totals_source["total_groups"]), totals_from(totals_source)

    def stream(self, *, chunk_size: int = 2000, pseudonymize: bool = False) -> Iterator[dict]:
        """Every grouped row, fetched ``chunk_size`` at a time through a server-side cursor on
        PostgreSQL (constant memory in this process whatever the number of rows)."""
        sql, params = self.grouped_sql(pseudonymize=pseudonymize)
        yield from stream_sql(sql, params, chunk_size=chunk_size)


def stream_sql(sql: str, params: Sequence[Any], *, chunk_size: int = 2000) -> Iterator[dict]:
    cursor = connection.chunked_cursor()
    try:
        cursor.execute(sql, params)
        names = [c[0] for c in cursor.description]
        while True:
            chunk = cursor.fetchmany(chunk_size)
            if not chunk:
                break
            for values in chunk:
                yield dict(zip(names, values, strict=True))
            chunk = None  # let it go before the next fetch: one chunk in memory at a time
    finally:
        cursor.close()


def _meta_table(app_label: str, model_name: str) -> str:
    from django.apps import apps

    return apps.get_model(app_label, model_name)._meta.db_table


def outcome_split(figures: Mapping[str, Any]) -> dict[str, int]:
    """Requests per ``Outcome``, from summed bucket figures. ``errors`` holds error, timeout and
    upstream_error together (kept so for older clients), so the plain errors are what is left of it;
    ok is every request no other outcome claims."""
    requests, errors = as_int(figures.get("requests")), as_int(figures.get("errors"))
    timeouts, upstream = as_int(figures.get("timeouts")), as_int(figures.get("upstream_errors"))
    quota, blocked = as_int(figures.get("quota_rejections")), as_int(figures.get("blocked"))
    disconnects = as_int(figures.get("client_disconnects"))
    return {
        Outcome.OK.value: max(requests - errors - quota - blocked - disconnects, 0),
        Outcome.ERROR.value: max(errors - timeouts - upstream, 0),
        Outcome.QUOTA.value: quota,
        Outcome.BLOCKED.value: blocked,
        Outcome.TIMEOUT.value: timeouts,
        Outcome.UPSTREAM_ERROR.value: upstream,
        Outcome.CLIENT_DISCONNECT.value: disconnects,
    }


def totals_from(source: dict[str, Any]) -> dict[str, Any]:
    requests = as_int(source.get("total_requests"))
    latency_sum = float(source.get("total_latency_sum_ms") or 0)
    single_bucket = as_int(source.get("total_buckets")) == 1
    totals: dict[str, Any] = {c: as_int(source.get(f"total_{c}")) for c in SUMMED}
    totals["latency_avg_ms"] = round(latency_sum / requests, 3) if requests else None
    totals["latency_p95_ms"] = as_float(source.get("total_latency_p95_ms")) if single_bucket else None
    totals["first_at"] = iso(as_datetime(source.get("total_first_at")))
    totals["last_at"] = iso(as_datetime(source.get("total_last_at")))
    totals["outcomes"] = outcome_split(totals)
    return totals

