"""ASGI entry point (uvicorn). Configuration errors stop start-up here, before any request."""

import os

import django
from django.core.exceptions import ImproperlyConfigured

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402

from twinmcp import config  # noqa: E402

if config.ERRORS:
    raise ImproperlyConfigured("; ".join(message for _, message in config.ERRORS))

from external_mcp.gateway.router import Router  # noqa: E402

application = Router(get_asgi_application())
