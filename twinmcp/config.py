"""Environment parsing that never raises at import time.

A bad value must stop start-up with a message naming the variable (a Django system
check), not crash settings import with a traceback. So every reader here falls back to
its default and records the problem in ``ERRORS``; ``twinmcp.checks`` reports them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

ERRORS: list[tuple[str, str]] = []

KNOWN_PROTOCOLS = {"http", "https"}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _read(name: str, default: T, parse: Callable[[str], T], *, secret: bool = False) -> T:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except (ValueError, TypeError) as exc:
        shown = "(value hidden)" if secret else repr(raw)
        ERRORS.append((name, f"{name}={shown} is invalid: {exc}"))
        return default


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _protocols(raw: str) -> list[str]:
    items = [p.strip().lower() for p in raw.split(",") if p.strip()]
    if not items:
        raise ValueError("expected at least one of http, https")
    unknown = [p for p in items if p not in KNOWN_PROTOCOLS]
    if unknown:
        raise ValueError(f"unsupported protocol {', '.join(unknown)}; allowed values: http, https")
    return items


def _networks(raw: str) -> list[str]:
    nets = []
    for item in (p.strip() for p in raw.split(",")):
        if item:
            try:
                nets.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not a CIDR network") from None
    return nets


def _csv(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def decode_key(item: str) -> bytes:
    """An encryption key is 32 bytes in URL-safe base64 (as ``Fernet.generate_key()``)."""
    try:
        key = base64.b64decode(item.encode("ascii") + b"=" * (-len(item) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("a key is not valid URL-safe base64") from None
    if len(key) != 32:
        raise ValueError(f"a key must decode to 32 bytes, got {len(key)}")
    return key


def _keys(raw: str) -> list[str]:
    items = _csv(raw)
    for position, item in enumerate(items, start=1):
        try:
            decode_key(item)
        except ValueError as exc:
            raise ValueError(f"key {position}: {exc}") from None
    return items


def string(name: str, default: str = "") -> str:
    return _raw(name) or default


def public_url(name: str, default: str) -> str:
    """The absolute http(s) URL people and servers reach TwinMCP at, without a trailing slash."""
    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("expected an absolute http(s) URL without query or fragment, e.g. https://twinmcp.example")
        return raw.strip().rstrip("/")

    return _read(name, default, parse)


def link_url_problem(value: str) -> str | None:
    """Why ``value`` cannot be a link people follow (None if it can): an absolute http(s) URL, or
    a path on this site starting with "/". Anything else (javascript:, a bare host name) is refused."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    if not parts.scheme and not parts.netloc and value.startswith("/") and not value.startswith("//"):
        return None
    return "expected an absolute http(s) URL (e.g. https://billing.example/upgrade) or a path starting with /"


def link_url(name: str, default: str = "") -> str:
    """An optional link: empty (unset), an absolute http(s) URL or a site path."""
    def parse(raw: str) -> str:
        problem = link_url_problem(raw)
        if problem:
            raise ValueError(problem)
        return raw

    return _read(name, default, parse)


def integer(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    def parse(raw: str) -> int:
        value = _positive_int(raw)
        if value < minimum:
            raise ValueError(f"expected a number >= {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"expected a number <= {maximum}")
        return value

    return _read(name, default, parse)


def boolean(name: str, default: bool) -> bool:
    return _read(name, default, _bool)


def protocols(name: str, default: list[str]) -> list[str]:
    return _read(name, default, _protocols)


def networks(name: str, default: list[str]) -> list[str]:
    return _read(name, default, _networks)


def csv_list(name: str, default: list[str]) -> list[str]:
    return _read(name, default, _csv)


def encryption_keys(name: str) -> list[str]:
    return _read(name, [], _keys, secret=True)
