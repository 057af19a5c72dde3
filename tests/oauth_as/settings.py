"""Settings of the test-only authorization server (``tests/oauth_as``): django-oauth-toolkit 3.x
configured the way a strict OAuth 2.1 deployment is, on a private SQLite file.

Read from the environment the parent test sets: ``DOT_DB`` (the SQLite file, required),
``DOT_ACCESS_TTL`` (access-token lifetime in seconds, 3600 by default) and ``DOT_DCR`` ("1" to
offer dynamic client registration). Loopback only and throwaway: nothing here is for production.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

DEBUG = False
SECRET_KEY = secrets.token_urlsafe(50)  # one process, one database: nothing outlives it
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.oauth_as.urls"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "/static/"  # the consent template links its stylesheet; nothing serves it
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "oauth2_provider",
]

MIDDLEWARE = [
    # First: counts token requests as they arrive, whatever the layers below answer.
    "tests.oauth_as.testing.TokenRequestCounter",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "tests.oauth_as.testing.AutoLogin",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": Path(os.environ["DOT_DB"]),
        # One uvicorn worker runs Django's sync views on one thread, so waits are rare; a busy
        # machine must still not turn one into "database is locked".
        "OPTIONS": {"timeout": 60},
    }
}

# DOT hashes client secrets with the first hasher and checks one on every client authentication:
# PBKDF2's million rounds cost a second each on a busy machine. A throwaway server needs no more.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

_ACCESS_TTL = int(os.environ.get("DOT_ACCESS_TTL", "3600"))


def _access_ttl(request: object) -> int:
    """The access-token lifetime, as a callable: oauthlib reads a literal 0 as "unset" and issues
    3600 s tokens instead, where a test asks for tokens that are expired when issued."""
    return _ACCESS_TTL


OAUTH2_PROVIDER = {
    "SCOPES": {"mcp": "Use the MCP servers this server protects"},
    "DEFAULT_SCOPES": ["mcp"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": _access_ttl,
    # Long enough that a loaded machine cannot let a code die between consent and exchange.
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 600,
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,  # a replay is refused at once, never "within grace"
    "REQUEST_APPROVAL_PROMPT": "force",  # every authorization shows the consent page
    "DCR_ENABLED": os.environ.get("DOT_DCR", "1") == "1",
    "DCR_REGISTRATION_PERMISSION_CLASSES": ("oauth2_provider.dcr.AllowAllDCRPermission",),
    # RFC 9700 gates, all on: the behaviour DOT 4.0 makes the default.
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,  # RFC 9207 `iss` on the authorization response
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,  # S256 only
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,  # tokens hashed at rest
    # RFC 8414 metadata: advertise only what this server does.
    "OAUTH2_RESPONSE_TYPES_SUPPORTED": ["code"],
    "OAUTH2_GRANT_TYPES_SUPPORTED": ["authorization_code", "client_credentials", "refresh_token"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
