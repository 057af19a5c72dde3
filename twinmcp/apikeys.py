"""TwinMCP API key format, hashing and lookup: shared by DRF and the proxy hot path."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from twinmcp.models import ApiKey, Membership

KEY_PREFIX = "tmcp_"
# 32 random bytes in URL-safe base64 without padding = 43 characters.
KEY_RE = re.compile(r"^tmcp_[A-Za-z0-9_-]{43}$")
DISPLAY_PREFIX_LEN = 12


class ApiKeyError(Exception):
    """Why a presented key was refused; the message is safe to show to the caller."""


@dataclass(frozen=True)
class NewKey:
    raw: str
    prefix: str
    key_hash: str


def generate_key() -> NewKey:
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(raw=raw, prefix=raw[:DISPLAY_PREFIX_LEN], key_hash=hash_key(raw))


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def parse_authorization(header: str | None) -> str:
    """Return the raw key from an ``Authorization: Bearer tmcp_…`` header."""
    if not header:
        raise ApiKeyError("Missing Authorization header; send 'Authorization: Bearer tmcp_…'.")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiKeyError("Malformed Authorization header; expected 'Bearer tmcp_…'.")
    value = value.strip()
    if not KEY_RE.fullmatch(value):
        raise ApiKeyError("Malformed API key; TwinMCP keys look like 'tmcp_' followed by 43 characters.")
    return value


def resolve_key(raw: str) -> ApiKey:
    """Find the active key for ``raw`` whose owner is still a member of its workspace."""
    digest = hash_key(raw)
    key = ApiKey.objects.select_related("user", "workspace").filter(key_hash=digest).first()
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        raise ApiKeyError("Unknown API key.")
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApiKeyError("This API key was revoked.")
    if key.expires_at is not None and key.expires_at <= now:
        raise ApiKeyError("This API key has expired.")
    if not key.user.is_active:
        raise ApiKeyError("The owner of this API key is inactive.")
    if not Membership.objects.filter(user_id=key.user_id, workspace_id=key.workspace_id).exists():
        raise ApiKeyError("The owner of this API key is no longer a member of its workspace.")
    touch(key, now=now)
    return key


def touch(key: ApiKey, *, now: datetime) -> None:
    """Record use at most once per TWINMCP_API_KEY_TOUCH_SECONDS, so busy keys cost no write."""
    threshold = now - timedelta(seconds=settings.TWINMCP_API_KEY_TOUCH_SECONDS)
    if key.last_used_at is None or key.last_used_at < threshold:
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=threshold)
        ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
