"""Who in a workspace stands where against the daily quota: each member's plan, today's use from
the live counters (Redis or the database, whichever the limiter counts in) and how often the
quota refused them over a period. Shared by the admin quota page and its API twin, so both
always say the same."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db.models import Q

from twinmcp.models import Membership, Plan, PlanCode
from twinmcp.services import plan_get
from usage.limiter import get_limiter
from usage.queries import UsageQuery, as_int


@dataclass(frozen=True)
class MemberQuota:
    user_id: int
    username: str
    role: str
    plan_code: str
    plan_name: str
    limit: int | None  # None: uncapped
    used: int
    remaining: int | None
    reset_at: datetime
    refusals: int  # quota rejections over the period

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def as_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "username": self.username, "role": self.role, "plan": self.plan_code,
            "limit": self.limit, "used": self.used, "remaining": self.remaining,
            "reset_at": self.reset_at.isoformat().replace("+00:00", "Z"), "quota_rejections": self.refusals,
        }


def _plan_of(membership: Membership, fallback: list[Plan]) -> Plan:
    """The member's plan; a user who never got a profile is on the free plan (as ``profile_ensure``
    would make it), fetched once for the whole list."""
    try:
        return membership.user.profile.plan
    except ObjectDoesNotExist:
        if not fallback:
            fallback.append(plan_get(code=PlanCode.FREE))
        return fallback[0]


def refusals_by_user(*, workspace_id: Any, user_id: int | None, start: date, end: date,
                     today: date) -> dict[int, int]:
    """Quota rejections per user over [start, end], from the same aggregates and fresh raw events
    the usage API reads (one statement)."""
    query = UsageQuery(start=start, end=end, today=today, scope=Q(workspace_id=workspace_id),
                       group_by=("user",), user_id=user_id)
    return {row["user_id"]: as_int(row["quota_rejections"]) for row in query.stream()
            if row["user_id"] is not None}


def member_quotas(*, workspace_id: Any, viewer_id: int, viewer_is_admin: bool, start: date, end: date,
                  now: datetime) -> list[MemberQuota]:
    """Every member of the workspace for an admin, only the viewer for a member; a constant number
    of queries whatever the number of members."""
    memberships = Membership.objects.filter(workspace_id=workspace_id).select_related("user", "user__profile__plan")
    if not viewer_is_admin:
        memberships = memberships.filter(user_id=viewer_id)
    rows = list(memberships.order_by("user__username"))
    fallback: list[Plan] = []
    plans = {m.user_id: _plan_of(m, fallback) for m in rows}
    decisions = get_limiter().peek_many({user_id: plan.effective_daily_limit for user_id, plan in plans.items()},
                                        now=now)
    refusals = refusals_by_user(workspace_id=workspace_id, user_id=None if viewer_is_admin else viewer_id,
                                start=start, end=end, today=now.date())
    result = []
    for membership in rows:
        plan, decision = plans[membership.user_id], decisions[membership.user_id]
        result.append(MemberQuota(
            user_id=membership.user_id, username=membership.user.get_username(), role=membership.role,
            plan_code=plan.code, plan_name=plan.name, limit=decision.limit, used=decision.used,
            remaining=decision.remaining, reset_at=decision.reset_at,
            refusals=refusals.get(membership.user_id, 0),
        ))
    return result

