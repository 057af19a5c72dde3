"""TwinMCP settings: one file, every value from the environment (documented in .env.example)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import environ

from twinmcp import config

BASE_DIR = Path(__file__).resolve().parent.parent
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")
VAR_DIR = Path(config.string("TWINMCP_VAR_DIR", str(BASE_DIR / "var")))

env = environ.Env()

DEBUG = config.boolean("DEBUG", False)
SECRET_KEY = config.string("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        config.ERRORS.append(("SECRET_KEY", "SECRET_KEY is required when DEBUG is false"))
    SECRET_KEY = "insecure-development-key-" + "x" * 40

ALLOWED_HOSTS = config.csv_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = config.csv_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "template_partials",
    "waffle",
    "django_prometheus",
    "twinmcp.apps.TwinMcpConfig",
    "external_mcp.apps.ExternalMcpConfig",
    "usage.apps.UsageConfig",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "twinmcp.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "twinmcp.csp.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "waffle.middleware.WaffleMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "twinmcp.urls"
WSGI_APPLICATION = "twinmcp.wsgi.application"
ASGI_APPLICATION = "twinmcp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "twinmcp.context_processors.ui",
            ],
        },
    }
]

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = config.integer("DATABASE_CONN_MAX_AGE", 60)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = config.string("REDIS_URL")

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "twinmcp"},
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
WHITENOISE_USE_FINDERS = DEBUG

# Security: strict by default, relaxed only by DEBUG (make run) or explicit variables.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = config.boolean("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^metrics$", r"^healthz$"]
SESSION_COOKIE_SECURE = config.boolean("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = config.boolean("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = config.integer("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = config.boolean("SECURE_HSTS_PRELOAD", not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "twinmcp.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "twinmcp.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    # Request bodies: depth-limited JSON, and no body read past DATA_UPLOAD_MAX_MEMORY_SIZE.
    "DEFAULT_PARSER_CLASSES": [
        "twinmcp.parsers.BoundedJSONParser",
        "twinmcp.parsers.BoundedFormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "twinmcp.api_errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "TwinMCP API",
    "DESCRIPTION": "Register external MCP servers, proxy their tools, read usage.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "AuthTypeEnum": "external_mcp.choices.AuthType",
        "ServerStatusEnum": "external_mcp.choices.ServerStatus",
        "TransportEnum": "external_mcp.choices.Transport",
    },
}

WAFFLE_FLAG_MODEL = "waffle.Flag"
WAFFLE_CREATE_MISSING_FLAGS = False
WAFFLE_FLAG_DEFAULT = False
EXTERNAL_MCP_FLAG = "external_mcp_connect"

# Celery: Redis when configured, otherwise kombu's filesystem transport (make run).
CELERY_BROKER_URL = REDIS_URL or "filesystem://"
if not REDIS_URL:
    (VAR_DIR / "broker").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(VAR_DIR / "broker"),
        "data_folder_out": str(VAR_DIR / "broker"),
        "processed_folder": str(VAR_DIR / "broker-processed"),
        "control_folder": str(VAR_DIR / "broker-control"),
        "store_processed": False,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ALWAYS_EAGER = config.boolean("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# How often beat starts a health sweep, and re-sends notification e-mails that are due.
EXTERNAL_MCP_HEALTH_SWEEP_SECONDS = config.integer("EXTERNAL_MCP_HEALTH_SWEEP_SECONDS", 15, minimum=1)
EXTERNAL_MCP_EMAIL_SWEEP_SECONDS = config.integer("EXTERNAL_MCP_EMAIL_SWEEP_SECONDS", 60, minimum=1)
CELERY_BEAT_SCHEDULE: dict[str, dict] = {
    "external-mcp-health-sweep": {
        "task": "external_mcp.tasks.health_sweep",
        "schedule": float(EXTERNAL_MCP_HEALTH_SWEEP_SECONDS),
    },
    "external-mcp-email-sweep": {
        "task": "external_mcp.tasks.email_sweep",
        "schedule": float(EXTERNAL_MCP_EMAIL_SWEEP_SECONDS),
    },
    # OAuth tokens to revoke whose first attempt failed (external_mcp.oauth.revocation).
    "external-mcp-revocations": {
        "task": "external_mcp.tasks.send_revocations",
        "schedule": float(EXTERNAL_MCP_EMAIL_SWEEP_SECONDS),
    },
    # Usage: finalise finished days (and any missed), refresh today's partial aggregates.
    "usage-aggregate": {
        "task": "usage.tasks.aggregate_usage",
        "schedule": float(config.integer("USAGE_AGGREGATE_EVERY_SECONDS", 900) or 900),
    },
    # Usage retention: delete raw events past EXTERNAL_MCP_USAGE_RETENTION_DAYS (finalised days only).
    "usage-retention": {
        "task": "usage.tasks.purge_usage",
        "schedule": float(config.integer("USAGE_RETENTION_EVERY_SECONDS", 86400) or 86400),
    },
    # Usage exports: deliver each finalised day to each destination, retrying failures (usage.delivery).
    "usage-exports": {
        "task": "usage.tasks.deliver_usage_exports",
        "schedule": float(config.integer("USAGE_EXPORT_EVERY_SECONDS", 300, minimum=1)),
    },
    # Usage alerts: evaluate the enabled rules on the raw events; each breach notifies once (usage.alerts).
    "usage-alerts": {
        "task": "usage.tasks.evaluate_usage_alerts",
        "schedule": 60.0,
    },
}

EMAIL_BACKEND = config.string("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = config.string("DEFAULT_FROM_EMAIL", "twinmcp@localhost")
# The SMTP backend's server (django.core.mail.backends.smtp.EmailBackend).
EMAIL_HOST = config.string("EMAIL_HOST", "localhost")
EMAIL_PORT = config.integer("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = config.string("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = config.string("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = config.boolean("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = config.boolean("EMAIL_USE_SSL", False)
# Seconds per SMTP operation: a mail server that hangs must not hold a worker (or its lease) for long.
EMAIL_TIMEOUT = config.integer("EMAIL_TIMEOUT", 10, minimum=1)
# Notification e-mails: a failed send is retried with exponential backoff (1 min, 2, 4 … at most 1 h)
# up to this many attempts; a claimed e-mail whose worker died is sent again once its lease ends.
EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS = config.integer("EXTERNAL_MCP_EMAIL_MAX_ATTEMPTS", 8, minimum=1)
EXTERNAL_MCP_EMAIL_LEASE_SECONDS = config.integer("EXTERNAL_MCP_EMAIL_LEASE_SECONDS", 300, minimum=1)

# Encryption key ring for upstream credentials: the first key encrypts, all decrypt.
TWINMCP_ENCRYPTION_KEYS = config.encryption_keys("TWINMCP_ENCRYPTION_KEYS")
if not TWINMCP_ENCRYPTION_KEYS:
    if DEBUG:
        # Development only: a key derived from SECRET_KEY, so make run needs no set-up.
        digest = hashlib.sha256(b"twinmcp-dev-encryption:" + SECRET_KEY.encode()).digest()
        TWINMCP_ENCRYPTION_KEYS = [base64.urlsafe_b64encode(digest).decode()]
    else:
        config.ERRORS.append(
            ("TWINMCP_ENCRYPTION_KEYS", "TWINMCP_ENCRYPTION_KEYS is required when DEBUG is false")
        )

# The story's variables.
EXTERNAL_MCP_PROXY_TIMEOUT_MS = config.integer("EXTERNAL_MCP_PROXY_TIMEOUT_MS", 30000)
EXTERNAL_MCP_ALLOWED_PROTOCOLS = config.protocols("EXTERNAL_MCP_ALLOWED_PROTOCOLS", ["https"])
EXTERNAL_MCP_ALLOWED_NETWORKS = config.networks("EXTERNAL_MCP_ALLOWED_NETWORKS", [])
EXTERNAL_MCP_MAX_PER_ORG = config.integer("EXTERNAL_MCP_MAX_PER_ORG", 20)
EXTERNAL_MCP_USAGE_RETENTION_DAYS = config.integer("EXTERNAL_MCP_USAGE_RETENTION_DAYS", 90)
EXTERNAL_MCP_FREE_DAILY_LIMIT = config.integer("EXTERNAL_MCP_FREE_DAILY_LIMIT", 200)
EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS = config.integer("EXTERNAL_MCP_QUOTA_REDIS_WAIT_MS", 2000)

# Usage reporting: aggregation, retention, API, billing hooks.
USAGE_FINALIZE_GRACE_SECONDS = config.integer("USAGE_FINALIZE_GRACE_SECONDS", 300)
USAGE_RETENTION_BATCH_SIZE = config.integer("USAGE_RETENTION_BATCH_SIZE", 5000) or 5000
USAGE_QUOTA_COUNTER_KEEP_DAYS = config.integer("USAGE_QUOTA_COUNTER_KEEP_DAYS", 7)
USAGE_MAX_RANGE_DAYS = config.integer("USAGE_MAX_RANGE_DAYS", 366) or 366
# Usage export pipelines (usage.delivery): first retry delay (doubled per failure, capped), how long
# a delivery may go without renewing its lease before another worker takes the day, ClickHouse timeout.
USAGE_EXPORT_RETRY_SECONDS = config.integer("USAGE_EXPORT_RETRY_SECONDS", 60, minimum=1)
USAGE_EXPORT_RETRY_MAX_SECONDS = config.integer("USAGE_EXPORT_RETRY_MAX_SECONDS", 3600, minimum=1)
USAGE_EXPORT_LEASE_SECONDS = config.integer("USAGE_EXPORT_LEASE_SECONDS", 600, minimum=10)
USAGE_EXPORT_TIMEOUT_SECONDS = config.integer("USAGE_EXPORT_TIMEOUT_SECONDS", 300, minimum=1)
USAGE_BILLING_HOOKS = config.csv_list("USAGE_BILLING_HOOKS", ["usage.billing.BillingRecordHook"])

# The proxy.
EXTERNAL_MCP_MAX_RESPONSE_BYTES = config.integer("EXTERNAL_MCP_MAX_RESPONSE_BYTES", 10 * 1024 * 1024)
EXTERNAL_MCP_PROXY_MAX_BODY_BYTES = config.integer("EXTERNAL_MCP_PROXY_MAX_BODY_BYTES", 1024 * 1024)
EXTERNAL_MCP_PROXY_STREAM_IDLE_SECONDS = config.integer("EXTERNAL_MCP_PROXY_STREAM_IDLE_SECONDS", 300)
EXTERNAL_MCP_PROXY_CACHE_SECONDS = config.integer("EXTERNAL_MCP_PROXY_CACHE_SECONDS", 5)
# Per-stage timings in each proxied request's log line (profiling; costs a few microseconds a call).
EXTERNAL_MCP_STAGE_TIMERS = config.boolean("EXTERNAL_MCP_STAGE_TIMERS", False)
EXTERNAL_MCP_COUNTED_METHODS = config.csv_list("EXTERNAL_MCP_COUNTED_METHODS", ["tools/call"])
EXTERNAL_MCP_TOKEN_COUNTER = config.string("EXTERNAL_MCP_TOKEN_COUNTER", "usage.tokens.ByteEstimate")
USAGE_GROUP_COMMIT = config.boolean("USAGE_GROUP_COMMIT", True)

# Health checks.
EXTERNAL_MCP_HEALTH_INTERVAL_SECONDS = config.integer("EXTERNAL_MCP_HEALTH_INTERVAL_SECONDS", 60)
EXTERNAL_MCP_HEALTH_TIMEOUT_MS = config.integer("EXTERNAL_MCP_HEALTH_TIMEOUT_MS", 10000)
EXTERNAL_MCP_HEALTH_SLOW_MS = config.integer("EXTERNAL_MCP_HEALTH_SLOW_MS", 5000)
EXTERNAL_MCP_HEALTH_DOWN_AFTER = config.integer("EXTERNAL_MCP_HEALTH_DOWN_AFTER", 3)
EXTERNAL_MCP_HEALTH_CONCURRENCY = config.integer("EXTERNAL_MCP_HEALTH_CONCURRENCY", 100)
EXTERNAL_MCP_HEALTH_SWEEP_LIMIT = config.integer("EXTERNAL_MCP_HEALTH_SWEEP_LIMIT", 2000)
# A server whose last check is older than this many of its intervals (plus one sweep period and the
# check timeout) is shown as stale: its recorded status is no longer believed (checks have stopped).
EXTERNAL_MCP_HEALTH_STALE_INTERVALS = config.integer("EXTERNAL_MCP_HEALTH_STALE_INTERVALS", 3, minimum=1)

# Tool names where several servers meet are <prefix>__<tool> (external_mcp/exposed_names.py) and fit
# this many characters (many clients cut at 64; the MCP rule allows 128). At least 40: the longest
# prefix (24), the separator and a short form's digest must fit.
EXTERNAL_MCP_TOOL_NAME_MAX_CHARS = config.integer("EXTERNAL_MCP_TOOL_NAME_MAX_CHARS", 64, minimum=40, maximum=128)
# The workspace and toolset endpoints: tools per tools/list page, how long one member's resources or
# prompts list may take before the list goes without it, and how long an idle agent session (and the
# upstream sessions TwinMCP opened for it) lives.
EXTERNAL_MCP_TOOLS_PAGE_SIZE = config.integer("EXTERNAL_MCP_TOOLS_PAGE_SIZE", 500, minimum=1, maximum=5000)
EXTERNAL_MCP_FANOUT_TIMEOUT_MS = config.integer("EXTERNAL_MCP_FANOUT_TIMEOUT_MS", 3000, minimum=100)
EXTERNAL_MCP_SESSION_IDLE_SECONDS = config.integer("EXTERNAL_MCP_SESSION_IDLE_SECONDS", 3600, minimum=60)
# HTTP+SSE upstreams: the event streams TwinMCP may hold open at once, per server and per workspace
# (an agent session on such a server holds one; idle ones end after EXTERNAL_MCP_SESSION_IDLE_SECONDS).
EXTERNAL_MCP_SSE_MAX_STREAMS_PER_SERVER = config.integer("EXTERNAL_MCP_SSE_MAX_STREAMS_PER_SERVER", 100, minimum=1)
EXTERNAL_MCP_SSE_MAX_STREAMS_PER_WORKSPACE = config.integer("EXTERNAL_MCP_SSE_MAX_STREAMS_PER_WORKSPACE", 500,
                                                            minimum=1)

TWINMCP_API_KEY_TOUCH_SECONDS = config.integer("TWINMCP_API_KEY_TOUCH_SECONDS", 300)
# Where the plan page's Upgrade button goes (an external checkout, or a site path); empty: no
# button, the page tells people to ask their workspace admin. Banner and 429s lead to /billing/.
TWINMCP_UPGRADE_URL = config.link_url("TWINMCP_UPGRADE_URL", "")
# Where browsers and authorization servers reach TwinMCP: OAuth sends admins back to
# <TWINMCP_PUBLIC_URL>/oauth/callback, and errors tell agents where to connect an account.
TWINMCP_PUBLIC_URL = config.public_url("TWINMCP_PUBLIC_URL", "http://127.0.0.1:8000")
# How long an OAuth authorization an admin started may take to come back (its state is single-use).
EXTERNAL_MCP_OAUTH_STATE_SECONDS = config.integer("EXTERNAL_MCP_OAUTH_STATE_SECONDS", 600, minimum=60, maximum=3600)

# Content-Security-Policy (twinmcp.csp): own assets only, no inline script or style, no eval.
TWINMCP_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI (drf-spectacular) boots with an inline script and style block.
TWINMCP_CSP_PATH_OVERRIDES = {
    "/api/docs/": TWINMCP_CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'")
    .replace("style-src 'self'", "style-src 'self' 'unsafe-inline'"),
}

# Metrics: a bearer token, or callers from these networks (the Prometheus scraper).
METRICS_BEARER_TOKEN = config.string("METRICS_BEARER_TOKEN")
METRICS_ALLOWED_NETWORKS = config.networks("METRICS_ALLOWED_NETWORKS", ["127.0.0.1/32", "::1/128"])

# Logs: JSON lines (one per proxied request and per health check) unless LOG_FORMAT=plain.
LOG_FORMAT = config.string("LOG_FORMAT", "plain" if DEBUG else "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"()": "twinmcp.jsonlog.RedactingFormatter",
                  "format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "twinmcp.jsonlog.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "plain"},
    },
    "root": {"handlers": ["console"], "level": config.string("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
