"""Validation of credential payloads per auth type, including mTLS certificate checks.

Errors name the payload field as ``credentials.<field>`` and never echo a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from django.core.exceptions import ValidationError
from django.utils import timezone

from external_mcp import urlpolicy
from external_mcp.choices import AuthType

MAX_PEM_BYTES = 64 * 1024
MAX_SECRET_CHARS = 8192
HEADER_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
# Headers the gateway owns or that would break the MCP exchange if a credential set them.
RESERVED_HEADERS = {
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "te", "trailer", "proxy-authorization", "proxy-connection", "cookie", "accept", "origin", "last-event-id",
}

FIELDS: dict[str, dict[str, bool]] = {
    AuthType.API_KEY: {"header": False, "value": True},
    AuthType.BASIC: {"username": True, "password": True},
    AuthType.BEARER: {"token": True},
    AuthType.MTLS: {"client_cert_pem": True, "client_key_pem": True, "ca_bundle_pem": False},
    AuthType.OAUTH2_CLIENT_CREDENTIALS: {"client_id": True, "client_secret": True, "token_url": False, "scope": False},
    # All optional: without a client id TwinMCP registers itself (RFC 7591) at the first Connect.
    AuthType.OAUTH2: {"client_id": False, "client_secret": False, "scopes": False},
}


@dataclass
class CleanCredentials:
    payload: dict[str, str]
    cert_subject: str = ""
    cert_issuer: str = ""
    cert_not_after: datetime | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)


def validate_credentials(auth_type: str, data: Any) -> CleanCredentials | None:
    """Return the cleaned payload for ``auth_type`` (None for ``none``) or raise ValidationError."""
    if auth_type == AuthType.NONE:
        if data not in (None, {}, ""):
            raise ValidationError({"credentials": ["auth_type 'none' takes no credentials."]})
        return None
    if auth_type not in FIELDS:
        raise ValidationError({"auth_type": [f"Unknown auth_type {auth_type!r}."]})
    if not isinstance(data, dict):
        raise ValidationError({"credentials": [f"An object with {', '.join(FIELDS[auth_type])} is required."]})
    errors: dict[str, list[str]] = {}
    payload: dict[str, str] = {}
    known = FIELDS[auth_type]
    for name in data:
        if name not in known:
            errors[f"credentials.{name}"] = [f"Unknown field for auth_type {auth_type!r}."]
    for name, required in known.items():
        value = data.get(name)
        if value in (None, ""):
            if required:
                errors[f"credentials.{name}"] = ["This field is required."]
            continue
        if not isinstance(value, str):
            errors[f"credentials.{name}"] = ["Must be a string."]
            continue
        payload[name] = value
    if auth_type == AuthType.OAUTH2 and "client_secret" in payload and "client_id" not in payload:
        errors["credentials.client_id"] = ["A client secret needs the client id it belongs to."]
    if errors:
        raise ValidationError(errors)
    clean = CleanCredentials(payload=payload)
    if auth_type == AuthType.MTLS:
        _check_mtls(clean)
    else:
        _check_header_values(auth_type, clean)
    if clean.errors:
        raise ValidationError(clean.errors)
    return clean


def _check_header_values(auth_type: str, clean: CleanCredentials) -> None:
    payload = clean.payload
    if auth_type == AuthType.API_KEY:
        payload.setdefault("header", "X-API-Key")
        header = payload["header"]
        if not HEADER_TOKEN_RE.fullmatch(header):
            clean.errors["credentials.header"] = ["Must be a valid HTTP header name (letters, digits, - and _)."]
        elif header.lower() in RESERVED_HEADERS or header.lower().startswith("mcp-"):
            clean.errors["credentials.header"] = [f"{header} is reserved by the MCP transport; choose another."]
    if auth_type == AuthType.BASIC and ":" in payload.get("username", ""):
        clean.errors["credentials.username"] = ["Must not contain ':'."]
    if "token_url" in payload:
        try:
            payload["token_url"] = urlpolicy.validate_url(payload["token_url"], resolve=False).url
        except urlpolicy.UrlPolicyError as exc:
            clean.errors["credentials.token_url"] = [str(exc)]
    for name, value in payload.items():
        if name == "header":
            continue
        if len(value) > MAX_SECRET_CHARS:
            clean.errors[f"credentials.{name}"] = [f"Longer than {MAX_SECRET_CHARS} characters."]
        elif any(ch in value for ch in "\r\n\x00") or not value.isprintable():
            clean.errors[f"credentials.{name}"] = ["Must not contain control characters or line breaks."]


def _check_mtls(clean: CleanCredentials) -> None:
    payload = clean.payload
    for name, value in payload.items():
        if len(value.encode("utf-8", "replace")) > MAX_PEM_BYTES:
            clean.errors[f"credentials.{name}"] = [f"Larger than {MAX_PEM_BYTES // 1024} KiB."]
    if clean.errors:
        return
    try:
        cert = x509.load_pem_x509_certificate(payload["client_cert_pem"].encode())
    except ValueError:
        clean.errors["credentials.client_cert_pem"] = ["Not a PEM-encoded X.509 certificate."]
        return
    try:
        key = serialization.load_pem_private_key(payload["client_key_pem"].encode(), password=None)
    except TypeError:
        clean.errors["credentials.client_key_pem"] = ["The private key is password-protected; upload it unencrypted."]
        return
    except (ValueError, UnsupportedAlgorithm):
        clean.errors["credentials.client_key_pem"] = ["Not a PEM-encoded private key."]
        return
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        clean.errors["credentials.client_key_pem"] = ["The private key does not match the certificate."]
        return
    not_after = cert.not_valid_after_utc
    if not_after <= timezone.now():
        clean.errors["credentials.client_cert_pem"] = [
            f"The certificate expired on {not_after.astimezone(UTC):%Y-%m-%d %H:%M} UTC."
        ]
        return
    if "ca_bundle_pem" in payload:
        try:
            if not x509.load_pem_x509_certificates(payload["ca_bundle_pem"].encode()):
                raise ValueError
        except ValueError:
            clean.errors["credentials.ca_bundle_pem"] = ["Not a PEM bundle of X.509 certificates."]
            return
    clean.cert_subject = cert.subject.rfc4514_string()[:500]
    clean.cert_issuer = cert.issuer.rfc4514_string()[:500]
    clean.cert_not_after = not_after
