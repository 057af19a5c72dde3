"""The daily quota at the gateway: take the request's counted uses before forwarding, give back
those the agent got no answer for (``usage/limiter.py`` decides; see docs/architecture.md,
"The daily quota")."""

from __future__ import annotations

from urllib.parse import urljoin

from django.conf import settings
from django.urls import reverse

from external_mcp import metrics
from external_mcp.gateway.call import Call
from external_mcp.gateway.errors import ProxyError
from external_mcp.jsonrpc import id_key, is_request
from external_mcp.proxy_cache import KeyInfo
from usage.limiter import get_limiter
from usage.models import Outcome
from usage.quota import QuotaUnavailable


def plan_page_url() -> str:
    """Absolute (agents have no base URL to resolve a path against), and always TwinMCP's plan page:
    the person behind the agent lands where the limit is explained and the upgrade offered."""
    return urljoin(f"{settings.TWINMCP_PUBLIC_URL}/", reverse("usage-ui-billing"))


async def take(call: Call, key: KeyInfo) -> list[tuple[bytes, bytes]]:
    """The RateLimit headers of the answer; raises the 429 (or the 503 when no decision can be
    made for a capped plan)."""
    if not call.counted:
        return []
    try:
        decision = await get_limiter().aconsume(key.user_id, key.daily_limit, call.counted)
    except QuotaUnavailable as exc:
        retry = str(exc.retry_after).encode()
        raise ProxyError(503, -32005, f"The daily quota cannot be checked right now; try again in "
                         f"{exc.retry_after} s.", outcome=Outcome.ERROR, error_class="quota_unavailable",
                         headers=[(b"retry-after", retry)], data={"retry_after": exc.retry_after}) from None
    headers: list[tuple[bytes, bytes]] = []
    if decision.limit is not None:
        reset = str(decision.retry_after).encode()
        headers = [(b"ratelimit-limit", str(decision.limit).encode()),
                   (b"ratelimit-remaining", str(decision.remaining or 0).encode()),
                   (b"ratelimit-reset", reset)]
    if decision.allowed:
        call.quota = decision
    else:
        metrics.QUOTA_REJECTIONS.labels(call.server_label).inc()
        raise ProxyError(
            429, -32029,
            f"Daily limit of {decision.limit} tool calls reached for the {key.plan} plan; it resets at "
            f"{decision.reset_at:%H:%M} UTC.",
            outcome=Outcome.QUOTA, headers=[(b"retry-after", str(decision.retry_after).encode()), *headers],
            data={"limit": decision.limit, "remaining": 0, "used": decision.used,
                  "reset_at": decision.reset_at.isoformat().replace("+00:00", "Z"), "plan": key.plan,
                  "upgrade_url": plan_page_url()},
        )
    call.lap("quota")
    return headers


def counted(call: Call, index: int) -> bool:
    """Whether the message at ``index`` is a use the quota admitted and kept."""
    message = call.messages[index]
    return (call.quota is not None and is_request(message)
            and message["method"] in settings.EXTERNAL_MCP_COUNTED_METHODS and index not in call.refunded)


async def refund(call: Call, *, keep_delivered: bool = False) -> None:
    """Give back the counted uses the agent got no answer for: all of them, unless
    ``keep_delivered``, then those whose response already reached the agent stay counted."""
    if call.quota is None or call.key is None:
        return
    replies = call.delivered if keep_delivered else {}
    given = [i for i, m in enumerate(call.messages)
             if counted(call, i) and id_key(m["id"]) not in replies]
    if given:
        call.refunded.update(given)
        await get_limiter().arefund(call.key.user_id, call.quota, len(given), refunded_total=len(call.refunded))
