"""What every page's top bar needs: whether the external-MCP pages exist for this user, the unread
notification count, and the quota banner. Everything is computed lazily (only when a template reads
it, at most once per request), so htmx partials, which do not render the top bar, cost no query."""

from __future__ import annotations

import logging
import zoneinfo
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from external_mcp.inbox import unread_count
from twinmcp.flags import external_mcp_enabled, require_external_mcp
from twinmcp.models import Membership, Role
from twinmcp.services import profile_ensure
from usage.limiter import get_limiter

logger = logging.getLogger(__name__)

QUOTA_WARNING_RATIO = 0.8
FLAG_ATTR = "_twinmcp_external_mcp"


def external_mcp_on(request: HttpRequest) -> bool:
    """``external_mcp_enabled`` memoised on the request (views that passed the flag check set it)."""
    cached = getattr(request, FLAG_ATTR, None)
    if cached is None:
        user = getattr(request, "user", None)
        cached = bool(user is not None and user.is_authenticated and external_mcp_enabled(request))
        setattr(request, FLAG_ATTR, cached)
    return cached


def require_external_mcp_page(request: HttpRequest) -> None:
    """``require_external_mcp`` (404 when the flag is off) for a page, remembering the answer for the top bar."""
    require_external_mcp(request)
    setattr(request, FLAG_ATTR, True)


@dataclass(frozen=True)
class QuotaBanner:
    level: str  # "warning" (>= 80 % used) or "exhausted"
    used: int
    limit: int
    plan: str
    reset_at: datetime  # UTC; templates show it in ``timezone`` too
    timezone: str

    @property
    def percent(self) -> int:
        return min(100, round(100 * self.used / self.limit)) if self.limit else 100

    @property
    def exhausted(self) -> bool:
        return self.level == "exhausted"

    @property
    def local_is_utc(self) -> bool:
        return self.timezone == "UTC"


def quota_banner(user: Any, *, now: datetime | None = None) -> QuotaBanner | None:
    """The banner a capped user sees at >= 80 % of today's limit, or None."""
    try:
        profile = profile_ensure(user=user)
        limit = profile.plan.effective_daily_limit
        if limit is None:
            return None
        decision = get_limiter().peek(user.pk, limit, now=now)
    except Exception:  # noqa: BLE001 - a banner must never break a page
        logger.warning("could not read the quota of user %s for the banner", getattr(user, "pk", None),
                       exc_info=True)
        return None
    if limit > 0 and decision.used < QUOTA_WARNING_RATIO * limit:
        return None
    try:
        tz = zoneinfo.ZoneInfo(profile.timezone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        tz = zoneinfo.ZoneInfo("UTC")
    return QuotaBanner(
        level="exhausted" if decision.used >= limit else "warning",
        used=decision.used, limit=limit, plan=profile.plan.name,
        reset_at=decision.reset_at, timezone=str(tz),
    )


def poll_ms() -> int:
    """How often a visible tab refreshes what it shows (TWINMCP_UI_POLL_SECONDS, default 30 s)."""
    return int(float(getattr(settings, "TWINMCP_UI_POLL_SECONDS", 30)) * 1000)


class UiState:
    """The lazily computed facts of the top bar (``{{ ui.… }}`` in templates)."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request

    @property
    def authenticated(self) -> bool:
        user = getattr(self.request, "user", None)
        return bool(user is not None and user.is_authenticated)

    @cached_property
    def external_mcp(self) -> bool:
        return self.authenticated and external_mcp_on(self.request)

    @cached_property
    def is_admin(self) -> bool:
        """Admin of at least one workspace (may add servers)."""
        return self.authenticated and Membership.objects.filter(user=self.request.user, role=Role.ADMIN).exists()

    @property
    def poll_ms(self) -> int:
        return poll_ms()

    @cached_property
    def unread_count(self) -> int:
        if not self.external_mcp:
            return 0
        return unread_count(self.request.user)

    @cached_property
    def quota(self) -> QuotaBanner | None:
        if not self.authenticated:
            return None
        return quota_banner(self.request.user)


def ui(request: HttpRequest) -> dict[str, Any]:
    return {"ui": UiState(request)}
