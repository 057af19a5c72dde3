"""SSRF policy for the URLs of external MCP servers.

Workspace admins choose these URLs, and the gateway then makes requests to them from inside our network, so a URL
must never lead to an internal address. The policy runs when a server is registered (``validate_url``) and again
for every address the HTTP client is about to connect to (``check_address``), because DNS answers can change
between the two.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote

import idna
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048

_DEFAULT_PORTS = {"https": 443, "http": 80}
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ENDS_IN_NUMBER_RE = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
_DECIMAL_RE = re.compile(r"[1-9][0-9]*|0")
_OCTAL_RE = re.compile(r"0[0-7]+")
_HEX_RE = re.compile(r"0x[0-9a-f]*")
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))

_FIX = "; add it to EXTERNAL_MCP_ALLOWED_NETWORKS to allow it"

UNSPECIFIED = "an unspecified address"
LOOPBACK = "a loopback address"
MULTICAST = "a multicast address"
LINK_LOCAL = "a link-local address"
PRIVATE = "a private address"
RESERVED = "a reserved address"
NOT_PUBLIC = "not a public address"
METADATA = "a cloud metadata address"

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.169.253",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_LOCALHOST_ADDRESSES = ("127.0.0.1", "::1")

_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class UrlPolicyError(ValueError):
    """A URL or address the gateway must not contact; the message is meant for the workspace admin."""


@dataclass(frozen=True)
class CheckedUrl:
    """The normalised form is what gets stored and connected to, so the checked URL and the used URL never differ."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def validate_url(url: str, *, resolve: bool = True, allow_unresolvable: bool = True) -> CheckedUrl:
    """Registration-time check.

    An unresolvable name is accepted by default because the server may not be published yet; connection-time
    checks still apply to whatever it resolves to later.
    """
    scheme, authority, rest = _split(url)
    host, port_text = _split_authority(authority)
    port = _parse_port(port_text, scheme)

    target = host if isinstance(host, ipaddress.IPv6Address) else _normalise_name(host)
    if isinstance(target, str):
        name = url_host = target
        addresses = _addresses_for_name(name, port, resolve=resolve, allow_unresolvable=allow_unresolvable)
        for address in addresses:
            check_address(address, host=name)
    else:
        name = str(target)
        url_host = f"[{name}]" if target.version == 6 else name
        addresses = (name,)
        check_address(target)

    port_suffix = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return CheckedUrl(
        url=f"{scheme}://{url_host}{port_suffix}{_normalise_path_and_query(rest)}",
        scheme=scheme,
        host=name,
        port=port,
        addresses=addresses,
    )


def check_address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, *, host: str | None = None) -> None:
    """Raise UrlPolicyError if this address may not be contacted.

    Used at connection time by the HTTP client (e.g. from an aiohttp resolver), since a name that passed at
    registration can later resolve elsewhere (DNS rebinding). ``host`` only improves the message.
    """
    address = _as_address(ip)
    embedded = _embedded_ipv4(address)
    subject = f"{address} ({embedded})" if embedded is not None else str(address)
    candidates = (address,) if embedded is None else (address, embedded)

    if any(candidate in METADATA_ADDRESSES for candidate in candidates):
        if host is None:
            raise UrlPolicyError(f"{subject} is {METADATA} and is always refused")
        raise UrlPolicyError(f"{host} resolves to {subject}, {METADATA} that is always refused")

    if any(candidate in network for network in _allowed_networks() for candidate in candidates):
        return

    reason = _refusal_reason(embedded) if embedded is not None else None
    if reason is None and not _is_translation(address):
        reason = _refusal_reason(address)
    if reason is None:
        return
    if host is None:
        raise UrlPolicyError(f"{subject} is {reason}{_FIX}")
    which = "which is " if reason == NOT_PUBLIC else ""
    raise UrlPolicyError(f"{host} resolves to {subject}, {which}{reason}{_FIX}")


def resolve_host(host: str, port: int) -> list[str]:
    """socket.getaddrinfo wrapper returning unique IP strings; raises socket.gaierror on failure.

    Kept as a separate function so the connection-time resolver and tests can share or replace it.
    """
    seen: dict[str, None] = {}
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen[str(sockaddr[0])] = None
    return list(seen)


def _allowed_schemes() -> list[str]:
    """Only schemes we know the default port of can be allowed, whatever the settings say."""
    return [s.lower() for s in settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS if s.lower() in _DEFAULT_PORTS]


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Read at call time so that settings changes (and test overrides) apply without a restart."""
    return [ipaddress.ip_network(n, strict=False) for n in settings.EXTERNAL_MCP_ALLOWED_NETWORKS]


def _split(url: str) -> tuple[str, str, str]:
    """Hand-rolled instead of urllib.parse because urlsplit silently tolerates the tricks we must refuse."""
    if not isinstance(url, str) or not url:
        raise UrlPolicyError("URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise UrlPolicyError(f"URL is longer than {MAX_URL_LENGTH} characters")
    if any(unicodedata.category(ch)[0] in "CZ" for ch in url):
        raise UrlPolicyError("URL contains whitespace or control characters")
    if "\\" in url:
        raise UrlPolicyError("URL contains a backslash, which clients interpret inconsistently")
    match = _SCHEME_RE.match(url)
    if match is None:
        raise UrlPolicyError("URL must start with a scheme such as https://")
    scheme = match.group(1).lower()
    allowed = _allowed_schemes()
    if scheme not in allowed:
        hint = " (add http to EXTERNAL_MCP_ALLOWED_PROTOCOLS for development)" if scheme == "http" else ""
        raise UrlPolicyError(f"{scheme} URLs are not allowed; allowed schemes: {', '.join(allowed) or 'none'}{hint}")
    if "#" in url:
        raise UrlPolicyError("URL must not contain a fragment (#…)")
    remainder = url[match.end() :]
    if not remainder.startswith("//"):
        raise UrlPolicyError("URL has no host")
    remainder = remainder[2:]
    end = min((i for i in (remainder.find("/"), remainder.find("?")) if i >= 0), default=len(remainder))
    authority, rest = remainder[:end], remainder[end:]
    if "@" in authority:
        raise UrlPolicyError("URL must not contain user credentials (user@host)")
    return scheme, authority, rest


def _split_authority(authority: str) -> tuple[str | ipaddress.IPv6Address, str | None]:
    """IPv6 literals are parsed here because their colons would otherwise be read as a port separator."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise UrlPolicyError("URL has an unterminated IPv6 address")
        literal, after = authority[1:close], authority[close + 1 :]
        if "%" in literal:
            raise UrlPolicyError("IPv6 zone identifiers are not allowed in URLs")
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise UrlPolicyError(f"[{literal}] is not a valid IPv6 address") from None
        if after and not after.startswith(":"):
            raise UrlPolicyError("URL has unexpected characters after the IPv6 address")
        return address, (after[1:] if after else None)
    if "%" in authority:
        raise UrlPolicyError("URL host must not contain percent-encoded characters")
    if authority.count(":") > 1:
        raise UrlPolicyError("IPv6 addresses in URLs must be enclosed in brackets")
    host, colon, port = authority.partition(":")
    if not host:
        raise UrlPolicyError("URL has no host")
    return host, (port if colon else None)


def _parse_port(text: str | None, scheme: str) -> int:
    """Ports are digits only: int() would also accept signs, underscores and spaces."""
    if text is None:
        return _DEFAULT_PORTS[scheme]
    if _PORT_RE.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise UrlPolicyError(f"port {text!r} is invalid; it must be a number between 1 and 65535")
    return int(text)


def _normalise_name(raw: str) -> str | ipaddress.IPv4Address:
    """Normalise to the ASCII form the resolver will see, so that lookalike spellings cannot slip past.

    UTS #46 mapping runs before the numeric check because it turns full-width digits and ideographic full stops
    into an ordinary dotted IPv4 address.
    """
    try:
        host = idna.encode(raw.lower(), uts46=True).decode("ascii").removesuffix(".")
    except idna.IDNAError:
        raise UrlPolicyError(f"{raw} is not a valid host name") from None
    if _ENDS_IN_NUMBER_RE.fullmatch(host.rsplit(".", 1)[-1]):
        return _parse_ipv4(host)
    if host in METADATA_HOSTS:
        raise UrlPolicyError(f"{host} is a cloud metadata host name and is always refused")
    return host


def _parse_ipv4(host: str) -> ipaddress.IPv4Address:
    """inet_aton-style parsing (the WHATWG URL rules): HTTP clients and resolvers accept forms like 0x7f.1 or
    2130706433 that ipaddress rejects, so they must be read the way a client would connect to them."""
    parts = host.split(".")
    numbers = [_parse_ipv4_number(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise UrlPolicyError(f"{host} is not a valid IPv4 address")
    *leading, last = [n for n in numbers if n is not None]
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(parts)):
        raise UrlPolicyError(f"{host} is not a valid IPv4 address")
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_number(part: str) -> int | None:
    """Regexes instead of bare int(), which would also accept '+1', '1_0' or ' 1'."""
    if _HEX_RE.fullmatch(part):
        return int(part[2:] or "0", 16)
    if _OCTAL_RE.fullmatch(part):
        return int(part[1:], 8)
    if _DECIMAL_RE.fullmatch(part):
        return int(part)
    return None


def _addresses_for_name(name: str, port: int, *, resolve: bool, allow_unresolvable: bool) -> tuple[str, ...]:
    """localhost is never sent to the resolver (RFC 6761): it is loopback whatever /etc/hosts says."""
    if name == "localhost" or name.endswith(".localhost"):
        return _LOCALHOST_ADDRESSES
    if not resolve:
        return ()
    try:
        return tuple(resolve_host(name, port))
    except socket.gaierror:
        if not allow_unresolvable:
            raise UrlPolicyError(f"{name} does not resolve") from None
        return ()


def _normalise_path_and_query(rest: str) -> str:
    """Only non-ASCII characters are encoded; existing escapes are kept so the server sees the admin's path."""
    path, question, query = rest.partition("?")
    normalised = quote(path, safe=_PRINTABLE_ASCII) or "/"
    if question and query:
        normalised += "?" + quote(query, safe=_PRINTABLE_ASCII)
    return normalised


def _as_address(ip: str | IPAddress) -> IPAddress:
    """Zone ids are dropped so that fe80::1%eth0 compares equal to the networks and addresses it belongs to."""
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            raise UrlPolicyError(f"{ip} is not a valid IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(int(ip))
    return ip


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """IPv6 forms that carry an IPv4 address can reach that IPv4 host, so it is the one that must be judged."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _is_translation(ip: IPAddress) -> bool:
    """Mapped and NAT64 addresses are the IPv4 host itself; their IPv6 prefix says nothing about the destination."""
    return isinstance(ip, ipaddress.IPv6Address) and (ip in _NAT64 or ip.ipv4_mapped is not None)


def _refusal_reason(ip: IPAddress) -> str | None:
    """The most specific reason first, so the admin learns what the address actually is."""
    if ip.is_unspecified:
        return UNSPECIFIED
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_multicast:
        return MULTICAST
    if ip.is_link_local:
        return LINK_LOCAL
    if any(ip in network for network in _PRIVATE_NETWORKS):
        return PRIVATE
    if ip.is_reserved:
        return RESERVED
    if not ip.is_global:
        return NOT_PUBLIC
    return None
