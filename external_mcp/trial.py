"""A connection test of the settings typed in the add or edit form, before anything is saved.

The same check a saved server gets (URL policy, transport, auth, initialize, tools/list) through the
same client, but nothing is recorded: a mistyped URL must not become a Down server, a notification,
an audit event or a stored secret.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ValidationError

from external_mcp import health, mcp_client, services
from external_mcp.auth_schemes import AuthScheme, build_scheme
from external_mcp.choices import AuthType, Transport
from external_mcp.credentials import validate_credentials
from external_mcp.models import ExternalMcpServer
from external_mcp.urlpolicy import UrlPolicyError, validate_url

# A test reaches out to an address an admin typed: a handful a minute is plenty for a person and
# too few to scan a network through the gateway.
TRIALS_PER_MINUTE = 10

UNTESTABLE = {
    AuthType.OAUTH2: "OAuth sign-in (authorization code) cannot be tested before saving: it needs a browser "
                     "sign-in at the authorization server. Save, then click Connect on the server's page.",
}


class TrialRefused(Exception):
    """The test cannot run for these settings; the message says why in an admin's words."""


def trial_allowed(*, user_id: Any) -> bool:
    """Count this user's tests in the current minute; False once over the limit."""
    key = f"twinmcp:trial:{user_id}"
    cache.add(key, 0, timeout=60)
    try:
        return cache.incr(key) <= TRIALS_PER_MINUTE
    except ValueError:  # expired between add and incr: a new minute
        cache.set(key, 1, timeout=60)
        return True


def credentials_to_test(*, server: ExternalMcpServer | None, auth_type: str, base_url: str,
                        typed: dict[str, str] | None) -> dict[str, str] | None:
    """The payload a test sends: what was typed, or on the edit form with nothing typed the stored
    secret, as saving keeps it. The stored secret is never sent to another origin (scheme, host or
    port): as when saving, a move needs the secret typed again."""
    if typed is not None or server is None or auth_type != server.auth_type:
        return typed
    if server.per_user:
        return {}  # the server stores no secret: the test needs one typed, and says which field
    if not server.has_credentials:
        return None
    if services.server_moves(server=server, base_url=base_url):
        raise ValidationError({"credentials": [services.MOVE_NEEDS_CREDENTIALS]})
    try:
        return services.credentials_payload(server=server)
    except services.CredentialUnavailable as exc:
        raise TrialRefused(str(exc)) from None


@dataclass(frozen=True)
class Trial:
    url: str
    scheme: AuthScheme
    transport: str = Transport.AUTO


def trial_prepare(*, base_url: str, auth_type: str, credentials: dict[str, str] | None,
                  transport: str = Transport.AUTO) -> Trial:
    """What a test will send, once the values pass what a save would require. Raises one
    ValidationError naming every field at fault (keys as the services name them), or
    TrialRefused for settings that cannot be tested before saving."""
    errors: dict[str, list[str]] = {}
    url = clean = None
    try:
        url = validate_url(base_url).url
    except UrlPolicyError as exc:
        errors["base_url"] = [str(exc)]
    try:
        clean = validate_credentials(auth_type, credentials if auth_type != AuthType.NONE else None)
    except ValidationError as exc:
        errors.update(exc.message_dict)
    if errors or url is None:
        raise ValidationError(errors)
    if auth_type in UNTESTABLE:
        raise TrialRefused(UNTESTABLE[auth_type])
    # No cache key: the TLS context of an unsaved certificate is never cached (and a check always
    # fetches a fresh OAuth token).
    return Trial(url=url, scheme=build_scheme(auth_type, clean.payload if clean else None), transport=transport)


def trial_run(trial: Trial) -> mcp_client.CheckResult:
    """The check itself; the client applies the URL policy again to every address it connects to."""
    return asyncio.run(_run(trial))


async def _run(trial: Trial) -> mcp_client.CheckResult:
    async with mcp_client.new_session(limit=2) as session:  # an HTTP+SSE server: its stream and a post
        return await mcp_client.check(trial.url, trial.scheme, session=session, timeouts=health.timeouts(),
                                      transport=trial.transport)
