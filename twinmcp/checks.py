"""System checks that turn bad configuration into one clear start-up error per variable."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register

from twinmcp import config


@register()
def environment_check(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    return [
        Error(message, hint=f"Fix {name} in the environment or .env (see .env.example).", id="twinmcp.E001")
        for name, message in config.ERRORS
    ]


@register()
def upgrade_url_check(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """The setting may also come from a settings module, bypassing the environment reader."""
    from django.conf import settings

    value = getattr(settings, "TWINMCP_UPGRADE_URL", "") or ""
    problem = config.link_url_problem(value) if value else None
    if problem is None:
        return []
    return [Error(f"TWINMCP_UPGRADE_URL={value[:200]!r} is invalid: {problem}",
                  hint="Fix TWINMCP_UPGRADE_URL (see .env.example), or leave it empty for no Upgrade button.",
                  id="twinmcp.E020")]
