"""Encryption at rest for upstream credentials (API keys, passwords, bearer tokens, mTLS keys).

Tokens look like ``v1.<key_id>.<body>``: the key id in clear lets a rotation job find rows
still made by an old key without decrypting anything, and the version prefix leaves room for
a future format. The body is urlsafe base64 (no padding) of ``nonce || AES-256-GCM ciphertext``.

Every token is bound to a *context* (for a credential, its server's UUID) through the GCM
associated data, so a ciphertext copied into another row fails authentication instead of
quietly handing one server's secret to another.

The key ring is ``settings.TWINMCP_ENCRYPTION_KEYS``: the first key encrypts, every key
decrypts, so a new key can be put in front while old rows are re-encrypted at leisure.
Settings are read on every call (tests and rotations change them) but the parsed ring is
cached on the tuple of key strings so AES objects are not rebuilt for each credential.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from twinmcp.config import decode_key

VERSION = "v1"
NONCE_SIZE = 12
TAG_SIZE = 16
SETTING = "TWINMCP_ENCRYPTION_KEYS"

_AAD_PREFIX = b"twinmcp:" + VERSION.encode() + b":"
_KEY_ID_PREFIX = b"twinmcp-key-id:"
_FINGERPRINT_INFO = b"twinmcp-credential-fingerprint"
_KEY_ID_RE = re.compile(r"[0-9a-f]{8}")
_BODY_RE = re.compile(r"[A-Za-z0-9_-]+")
_MALFORMED = "malformed ciphertext"


class DecryptionError(Exception):
    """A stored secret cannot be recovered.

    Messages name at most a key id (a non-secret hash), never key material, plaintext or
    the token, because they end up in logs, audit rows and API error bodies.
    """


@dataclass(frozen=True)
class _Ring:
    current_id: str
    ciphers: dict[str, AESGCM]


def key_id(key: bytes) -> str:
    """A short public name for a key, so tokens can say which key made them without revealing it.

    Domain-separated so the id cannot be confused with any other hash of the key.
    """
    return hashlib.sha256(_KEY_ID_PREFIX + key).digest()[:4].hex()


def _configured_keys() -> tuple[str, ...]:
    keys = getattr(settings, SETTING, None) or ()
    if isinstance(keys, str):
        # Tolerate the raw environment form (comma-separated) being assigned directly.
        keys = [item.strip() for item in keys.split(",") if item.strip()]
    return tuple(keys)


@lru_cache(maxsize=8)
def _parse_ring(keys: tuple[str, ...]) -> _Ring:
    """Cached on the key strings: a changed setting is a new cache entry, not a stale ring."""
    if not keys:
        raise ImproperlyConfigured(
            f"{SETTING} is empty: set it to one or more URL-safe base64 32-byte keys "
            "(the first encrypts, all decrypt) to store or read credentials"
        )
    ciphers: dict[str, AESGCM] = {}
    raw_by_id: dict[str, bytes] = {}
    current_id = ""
    for position, item in enumerate(keys, start=1):
        try:
            raw = decode_key(item)
        except ValueError as exc:
            # decode_key's messages never include the key itself.
            raise ImproperlyConfigured(f"{SETTING} key {position}: {exc}") from None
        kid = key_id(raw)
        if kid in raw_by_id and not hmac.compare_digest(raw_by_id[kid], raw):
            raise ImproperlyConfigured(
                f"{SETTING} key {position} has the same key id {kid} as an earlier, different key; generate a new key"
            )
        raw_by_id[kid] = raw
        ciphers.setdefault(kid, AESGCM(raw))
        current_id = current_id or kid
    return _Ring(current_id=current_id, ciphers=ciphers)


def _ring() -> _Ring:
    return _parse_ring(_configured_keys())


def current_key_id() -> str:
    """The id new tokens get; anything else is due for re-encryption."""
    return _ring().current_id


def _associated_data(context: str) -> bytes:
    # An empty context would let a token be moved between any two rows that forgot to pass one.
    if not isinstance(context, str):
        raise TypeError("context must be a str (for example the owning row's UUID)")
    if not context:
        raise ValueError("context must not be empty: it binds the ciphertext to its row")
    return _AAD_PREFIX + context.encode("utf-8")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parse(token: str) -> tuple[str, bytes]:
    """Split a token into (key id, nonce || ciphertext), rejecting anything not produced by ``encrypt``."""
    if not isinstance(token, str):
        raise DecryptionError(_MALFORMED)
    parts = token.split(".")
    if len(parts) != 3:
        raise DecryptionError(_MALFORMED)
    version, kid, body = parts
    if version != VERSION or not _KEY_ID_RE.fullmatch(kid) or not _BODY_RE.fullmatch(body):
        raise DecryptionError(_MALFORMED)
    try:
        blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise DecryptionError(_MALFORMED) from None
    # Only the canonical encoding is accepted, so no edit of the text goes unnoticed
    # (otherwise the unused low bits of the last character could change freely).
    if _b64encode(blob) != body or len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError(_MALFORMED)
    return kid, blob


def encrypt(plaintext: bytes, *, context: str) -> str:
    """Always with the first ring key and a fresh random nonce, so equal secrets give unequal tokens."""
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError("encrypt() takes bytes; use encrypt_json() for structured secrets")
    aad = _associated_data(context)
    ring = _ring()
    nonce = os.urandom(NONCE_SIZE)
    sealed = ring.ciphers[ring.current_id].encrypt(nonce, bytes(plaintext), aad)
    return f"{VERSION}.{ring.current_id}.{_b64encode(nonce + sealed)}"


def decrypt(token: str, *, context: str) -> bytes:
    """Any ring key may have made the token; the wrong context fails like tampering does."""
    aad = _associated_data(context)
    kid, blob = _parse(token)
    cipher = _ring().ciphers.get(kid)
    if cipher is None:
        raise DecryptionError(f"encrypted with key {kid}, which is not in {SETTING}")
    try:
        return cipher.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError(
            f"ciphertext made with key {kid} could not be decrypted (wrong key or tampered data)"
        ) from None


def _canonical_json(data: dict) -> bytes:
    """One byte string per value, so equal dicts encrypt and fingerprint alike whatever their key order."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict, got {type(data).__name__}")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encrypt_json(data: dict, *, context: str) -> str:
    """For credentials with several fields (username + password, cert + key) stored as one token."""
    return encrypt(_canonical_json(data), context=context)


def decrypt_json(token: str, *, context: str) -> dict:
    """The counterpart of ``encrypt_json``; a token holding anything but a JSON object is an error."""
    raw = decrypt(token, context=context)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        # No detail from the parser: it would quote the plaintext.
        raise DecryptionError("decrypted data is not valid JSON") from None
    if not isinstance(data, dict):
        raise DecryptionError("decrypted data is not a JSON object")
    return data


def token_key_id(token: str) -> str:
    """Lets a rotation job pick rows by key without holding, or even knowing, that key."""
    kid, _blob = _parse(token)
    return kid


def needs_rotation(token: str) -> bool:
    """Rows whose token predates the current first key; a malformed token raises rather than hides."""
    return token_key_id(token) != current_key_id()


def reencrypt(token: str, *, context: str) -> str:
    """Moves a secret onto the current key; decrypting first also proves the token and context are intact."""
    return encrypt(decrypt(token, context=context), context=context)


@lru_cache(maxsize=4)
def _fingerprint_key(secret_key: str) -> bytes:
    """Derived from SECRET_KEY, not the encryption ring, so rotating encryption keys keeps fingerprints."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FINGERPRINT_INFO)
    return hkdf.derive(secret_key.encode("utf-8"))


def fingerprint(data: dict | bytes | str) -> str:
    """Lets admins see whether two secrets are equal without seeing either.

    Keyed (HMAC) so that a short or guessable secret cannot be confirmed by hashing candidates
    without the server's SECRET_KEY; truncated because it only has to tell secrets apart.
    """
    if isinstance(data, dict):
        payload = _canonical_json(data)
    elif isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        raise TypeError(f"cannot fingerprint {type(data).__name__}")
    digest = hmac.new(_fingerprint_key(settings.SECRET_KEY), payload, hashlib.sha256).hexdigest()
    return "sha256:" + digest[:16]
