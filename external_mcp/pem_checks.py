"""The mTLS parts of the add/edit form, each checked on its own, and the parts that passed kept
across a re-render.

The service (``external_mcp.credentials``) stays the authority and stops at the first problem;
the form checks every part first so an admin fixes everything in one round trip. The messages
are the service's. Kept parts travel in the page encrypted (``external_mcp.crypto``), bound to the
user and valid for a short while: a file input cannot be refilled, and a private key must never
be put back in the page in clear.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from django.utils import timezone

from external_mcp import crypto
from external_mcp.credentials import MAX_PEM_BYTES

PARTS = ("client_cert_pem", "client_key_pem", "ca_bundle_pem")
PASTED = {"client_cert_pem": "pasted certificate", "client_key_pem": "pasted private key",
          "ca_bundle_pem": "pasted CA bundle"}
KEPT_SECONDS = 15 * 60
MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class Pem:
    text: str
    name: str


def problems(given: dict[str, Pem]) -> dict[str, str]:
    """Part -> what is wrong with it, for every part given; a key is matched against a certificate
    only when both are readable."""
    found: dict[str, str] = {}
    cert = key = None
    for part, pem in given.items():
        if len(pem.text.encode("utf-8", "replace")) > MAX_PEM_BYTES:
            found[part] = f"Larger than {MAX_PEM_BYTES // 1024} KiB."
    if "client_cert_pem" in given and "client_cert_pem" not in found:
        try:
            cert = x509.load_pem_x509_certificate(given["client_cert_pem"].text.encode())
        except ValueError:
            found["client_cert_pem"] = "Not a PEM-encoded X.509 certificate."
        else:
            not_after = cert.not_valid_after_utc
            if not_after <= timezone.now():
                found["client_cert_pem"] = f"The certificate expired on {not_after.astimezone(UTC):%Y-%m-%d %H:%M} UTC."
    if "client_key_pem" in given and "client_key_pem" not in found:
        try:
            key = serialization.load_pem_private_key(given["client_key_pem"].text.encode(), password=None)
        except TypeError:
            found["client_key_pem"] = "The private key is password-protected; upload it unencrypted."
        except (ValueError, UnsupportedAlgorithm):
            found["client_key_pem"] = "Not a PEM-encoded private key."
    if "ca_bundle_pem" in given and "ca_bundle_pem" not in found:
        try:
            if not x509.load_pem_x509_certificates(given["ca_bundle_pem"].text.encode()):
                raise ValueError
        except ValueError:
            found["ca_bundle_pem"] = "Not a PEM bundle of X.509 certificates."
    if cert is not None and key is not None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            found["client_key_pem"] = "The private key does not match the certificate."
    return found


def _context(owner: Any) -> str:
    return f"kept-pem:{owner.pk}"


def keep(parts: dict[str, Pem], *, owner: Any) -> str:
    """The token a re-rendered form carries back."""
    body = {"until": int(time.time()) + KEPT_SECONDS,
            "parts": {part: {"text": pem.text, "name": pem.name[:MAX_NAME_CHARS]} for part, pem in parts.items()}}
    return crypto.encrypt(json.dumps(body).encode(), context=_context(owner))


def kept(token: str, *, owner: Any) -> dict[str, Pem]:
    """The parts a token holds; nothing when it is another user's, expired or tampered with."""
    try:
        body = json.loads(crypto.decrypt(token, context=_context(owner)))
    except (crypto.DecryptionError, ValueError):
        return {}
    if not isinstance(body, dict) or not isinstance(body.get("until"), int) or body["until"] < time.time():
        return {}
    parts = body.get("parts") if isinstance(body.get("parts"), dict) else {}
    return {part: Pem(text=str(value["text"]), name=str(value["name"]))
            for part, value in parts.items() if part in PARTS and isinstance(value, dict)}
