"""The plan page (/billing/): the caller's plan, where they stand today and what the paid plan
gives. Every "upgrade" pointer in TwinMCP (the quota banner, the 429 agents get) leads here, so a
person always lands on a page that explains the limit before any external checkout."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from twinmcp.models import PlanCode
from twinmcp.services import plan_get, profile_ensure
from usage.limiter import get_limiter
from usage.quota import QuotaUnavailable, next_reset


def upgrade_destination() -> str:
    """Where the Upgrade button goes: ``TWINMCP_UPGRADE_URL``, unless it is empty or points back
    at this page (nothing to buy here then: the page says whom to ask instead)."""
    url = settings.TWINMCP_UPGRADE_URL.strip()
    if not url or url.rstrip("/") in ("/billing", f"{settings.TWINMCP_PUBLIC_URL}/billing"):
        return ""
    return url


@login_required
@require_http_methods(["GET"])
def plan_page(request: HttpRequest) -> HttpResponse:
    plan = profile_ensure(user=request.user).plan
    now = timezone.now()
    try:
        decision = get_limiter().peek(request.user.pk, plan.effective_daily_limit, now=now)
    except QuotaUnavailable:
        decision = None
    paid = plan_get(code=PlanCode.PRO) if plan.code != PlanCode.PRO else plan
    context = {
        "plan": plan,
        "paid_plan": paid,
        "decision": decision,
        "reset_at": decision.reset_at if decision else next_reset(now),
        "upgrade_url": upgrade_destination() if plan.effective_daily_limit is not None else "",
        "is_capped": plan.effective_daily_limit is not None,
        "usage_url": reverse("usage-ui-dashboard"),
    }
    return render(request, "twinmcp/billing.html", context)
