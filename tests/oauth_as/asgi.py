"""The authorization server's ASGI application, for uvicorn in the server's own process."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.oauth_as.settings")

application = get_asgi_application()
