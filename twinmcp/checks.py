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
