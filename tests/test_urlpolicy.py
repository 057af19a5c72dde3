"""SSRF policy for external MCP server URLs: every hostile spelling is refused with a message the admin can act on.

No network is used: literal addresses need no resolution, `localhost` never reaches the resolver, and hypothetical
public or private DNS answers are simulated by replacing `resolve_host` (there is no DNS on the test machines).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from external_mcp import urlpolicy
from external_mcp.urlpolicy import CheckedUrl, UrlPolicyError, check_address, resolve_host, validate_url

FIX = "; add it to EXTERNAL_MCP_ALLOWED_NETWORKS to allow it"
LOOPBACK = "127.0.0.1 is a loopback address" + FIX
WRAPPED_LOOPBACK = "(127.0.0.1) is a loopback address" + FIX
METADATA = "169.254.169.254 is a cloud metadata address and is always refused"


@pytest.fixture(autouse=True)
def _policy_defaults(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = []
    return settings


@pytest.fixture
def dns(monkeypatch) -> dict[str, list[str]]:
    """Simulated answers for hypothetical names; any other name fails like an unknown name would."""
    answers: dict[str, list[str]] = {}

    def fake_resolve_host(host: str, port: int) -> list[str]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    monkeypatch.setattr(urlpolicy, "resolve_host", fake_resolve_host)
    return answers


def refused(url: str, **kwargs: bool) -> str:
    with pytest.raises(UrlPolicyError) as info:
        validate_url(url, **kwargs)
    return str(info.value)


HOSTILE = [
    # loopback, in every notation a client might accept
    ("https://127.0.0.1/mcp", LOOPBACK),
    ("https://127.0.0.1./mcp", LOOPBACK),
    ("https://2130706433/mcp", LOOPBACK),
    ("https://0x7f000001/mcp", LOOPBACK),
    ("https://0x7f.0.0.1/mcp", LOOPBACK),
    ("https://0X7F.0x0.0.01/mcp", LOOPBACK),
    ("https://0177.0.0.1/mcp", LOOPBACK),
    ("https://017700000001/mcp", LOOPBACK),
    ("https://127.1/mcp", LOOPBACK),
    ("https://127.0.1/mcp", LOOPBACK),
    ("https://１２７。０。０。１/mcp", LOOPBACK),
    ("https://[::1]/mcp", "::1 is a loopback address" + FIX),
    ("https://[::ffff:127.0.0.1]/mcp", WRAPPED_LOOPBACK),
    ("https://[::ffff:7f00:1]/mcp", WRAPPED_LOOPBACK),
    ("https://[0:0:0:0:0:ffff:7f00:1]/mcp", WRAPPED_LOOPBACK),
    ("https://[::127.0.0.1]/mcp", "::7f00:1 (127.0.0.1) is a loopback address" + FIX),
    ("https://[64:ff9b::7f00:1]/mcp", "64:ff9b::7f00:1 (127.0.0.1) is a loopback address" + FIX),
    ("https://[2002:7f00:1::]/mcp", "2002:7f00:1:: (127.0.0.1) is a loopback address" + FIX),
    ("https://[fe80::1%25eth0]/mcp", "IPv6 zone identifiers are not allowed in URLs"),
    ("https://localhost/mcp", "localhost resolves to 127.0.0.1, a loopback address" + FIX),
    ("https://LOCALHOST./mcp", "localhost resolves to 127.0.0.1, a loopback address" + FIX),
    ("https://api.localhost/mcp", "api.localhost resolves to 127.0.0.1, a loopback address" + FIX),
    # private and otherwise non-public ranges
    ("https://10.0.0.1/mcp", "10.0.0.1 is a private address" + FIX),
    ("https://012.1/mcp", "10.0.0.1 is a private address" + FIX),
    ("https://172.16.5.4/mcp", "172.16.5.4 is a private address" + FIX),
    ("https://172.31.255.255/mcp", "172.31.255.255 is a private address" + FIX),
    ("https://192.168.1.1/mcp", "192.168.1.1 is a private address" + FIX),
    ("https://[::ffff:10.0.0.1]/mcp", "(10.0.0.1) is a private address" + FIX),
    ("https://[fc00::1]/mcp", "fc00::1 is a private address" + FIX),
    ("https://0.0.0.0/mcp", "0.0.0.0 is an unspecified address" + FIX),
    ("https://0/mcp", "0.0.0.0 is an unspecified address" + FIX),
    ("https://[::]/mcp", ":: is an unspecified address" + FIX),
    ("https://169.254.1.1/mcp", "169.254.1.1 is a link-local address" + FIX),
    ("https://[fe80::1]/mcp", "fe80::1 is a link-local address" + FIX),
    ("https://224.0.0.1/mcp", "224.0.0.1 is a multicast address" + FIX),
    ("https://[ff02::1]/mcp", "ff02::1 is a multicast address" + FIX),
    ("https://100.64.0.1/mcp", "100.64.0.1 is not a public address" + FIX),
    ("https://198.18.0.1/mcp", "198.18.0.1 is not a public address" + FIX),
    ("https://192.0.2.10/mcp", "192.0.2.10 is not a public address" + FIX),
    ("https://203.0.113.7/mcp", "203.0.113.7 is not a public address" + FIX),
    ("https://[2001:db8::1]/mcp", "2001:db8::1 is not a public address" + FIX),
    ("https://255.255.255.255/mcp", "255.255.255.255 is a reserved address" + FIX),
    ("https://240.0.0.1/mcp", "240.0.0.1 is a reserved address" + FIX),
    # cloud metadata
    ("https://169.254.169.254/latest/meta-data/", METADATA),
    ("https://2852039166/latest/meta-data/", METADATA),
    ("https://0xa9fea9fe/latest/meta-data/", METADATA),
    ("https://0251.0376.0251.0376/latest/meta-data/", METADATA),
    ("https://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe (169.254.169.254) is a cloud metadata address"),
    ("https://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address and is always refused"),
    ("https://100.100.100.200/", "100.100.100.200 is a cloud metadata address and is always refused"),
    ("https://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal is a cloud metadata host"),
    ("https://Metadata.Google.Internal./computeMetadata/v1/", "metadata.google.internal is a cloud metadata host"),
    ("https://metadata/", "metadata is a cloud metadata host name and is always refused"),
    ("https://instance-data.ec2.internal/", "instance-data.ec2.internal is a cloud metadata host name"),
    # URL tricks
    ("https://user:pass@example.com/mcp", "URL must not contain user credentials (user@host)"),
    ("https://good.com@127.0.0.1/mcp", "URL must not contain user credentials (user@host)"),
    ("https://@example.com/mcp", "URL must not contain user credentials (user@host)"),
    ("https://example.com\\@127.0.0.1/mcp", "URL contains a backslash"),
    ("https://example.com/mcp#x", "URL must not contain a fragment"),
    ("https://example.com/mcp\n", "URL contains whitespace or control characters"),
    ("https://exa mple.com/mcp", "URL contains whitespace or control characters"),
    ("https://example.com\x00.evil/mcp", "URL contains whitespace or control characters"),
    ("https://exa%6dple.com/mcp", "URL host must not contain percent-encoded characters"),
    # schemes
    ("ftp://example.com/file", "ftp URLs are not allowed; allowed schemes: https"),
    ("file:///etc/passwd", "file URLs are not allowed; allowed schemes: https"),
    ("gopher://127.0.0.1:70/_x", "gopher URLs are not allowed; allowed schemes: https"),
    ("javascript:alert(1)", "javascript URLs are not allowed; allowed schemes: https"),
    (
        "http://example.com/mcp",
        "http URLs are not allowed; allowed schemes: https"
        " (add http to EXTERNAL_MCP_ALLOWED_PROTOCOLS for development)",
    ),
    # garbage
    ("", "URL is empty"),
    ("not a url", "URL contains whitespace or control characters"),
    ("example", "URL must start with a scheme such as https://"),
    ("//example.com/mcp", "URL must start with a scheme such as https://"),
    ("https:example.com", "URL has no host"),
    ("https:///mcp", "URL has no host"),
    ("https://:443/mcp", "URL has no host"),
    ("https://example.com:0/mcp", "port '0' is invalid; it must be a number between 1 and 65535"),
    ("https://example.com:70000/mcp", "port '70000' is invalid"),
    ("https://example.com:https/mcp", "port 'https' is invalid"),
    ("https://example.com:/mcp", "port '' is invalid"),
    ("https://example.com:+443/mcp", "port '+443' is invalid"),
    ("https://::1/mcp", "IPv6 addresses in URLs must be enclosed in brackets"),
    ("https://[::1/mcp", "URL has an unterminated IPv6 address"),
    ("https://[127.0.0.1]/mcp", "[127.0.0.1] is not a valid IPv6 address"),
    ("https://[::1]evil.com/mcp", "URL has unexpected characters after the IPv6 address"),
    ("https://foo_bar.example/mcp", "foo_bar.example is not a valid host name"),
    ("https://a..example/mcp", "a..example is not a valid host name"),
    ("https://-a.example/mcp", "-a.example is not a valid host name"),
    ("https://1.2.3.4.5/mcp", "1.2.3.4.5 is not a valid IPv4 address"),
    ("https://256.1.1.1/mcp", "256.1.1.1 is not a valid IPv4 address"),
    ("https://1.16777216/mcp", "1.16777216 is not a valid IPv4 address"),
    ("https://1.2.3.08/mcp", "1.2.3.08 is not a valid IPv4 address"),
    ("https://0xg.1/mcp", "0xg.1 is not a valid IPv4 address"),
    ("https://0x.0x.0x.0x/mcp", "0.0.0.0 is an unspecified address" + FIX),
    ("https://internal.10/mcp", "internal.10 is not a valid IPv4 address"),
    ("https://" + "a" * 2048 + ".example/", "URL is longer than 2048 characters"),
]


@pytest.mark.parametrize(("url", "expected"), HOSTILE, ids=[url[:60] or "<empty>" for url, _ in HOSTILE])
def test_hostile_url_is_refused_with_a_reason(url: str, expected: str) -> None:
    assert expected in refused(url)


def test_a_name_resolving_to_loopback_is_refused(dns) -> None:
    dns["rebind.example"] = ["127.0.0.1"]
    assert refused("https://rebind.example/mcp") == "rebind.example resolves to 127.0.0.1, a loopback address" + FIX


def test_one_private_answer_among_several_is_enough_to_refuse(dns) -> None:
    dns["mixed.example"] = ["93.184.215.14", "2606:4700::1111", "10.0.0.7"]
    assert refused("https://mixed.example/mcp") == "mixed.example resolves to 10.0.0.7, a private address" + FIX


def test_a_name_resolving_to_a_non_public_address_is_refused(dns) -> None:
    dns["cgnat.example"] = ["100.64.3.4"]
    assert refused("https://cgnat.example/") == (
        "cgnat.example resolves to 100.64.3.4, which is not a public address" + FIX
    )


def test_a_name_resolving_to_a_metadata_address_is_always_refused(dns, settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["0.0.0.0/0"]
    dns["meta.example"] = ["169.254.169.254"]
    assert refused("https://meta.example/") == (
        "meta.example resolves to 169.254.169.254, a cloud metadata address that is always refused"
    )


def test_a_name_resolving_to_a_wrapped_loopback_names_the_embedded_address(dns) -> None:
    dns["mapped.example"] = ["::ffff:127.0.0.1"]
    assert refused("https://mapped.example/") == (
        "mapped.example resolves to ::ffff:7f00:1 (127.0.0.1), a loopback address" + FIX
    )


# --- allowed -------------------------------------------------------------------------------------------------------


def test_public_ipv4_literal_is_allowed() -> None:
    assert validate_url("https://93.184.215.14/mcp") == CheckedUrl(
        url="https://93.184.215.14/mcp", scheme="https", host="93.184.215.14", port=443, addresses=("93.184.215.14",)
    )


def test_public_ipv6_literal_is_allowed() -> None:
    checked = validate_url("https://[2606:4700::1111]/mcp")
    assert checked.url == "https://[2606:4700::1111]/mcp"
    assert checked.host == "2606:4700::1111"
    assert checked.addresses == ("2606:4700::1111",)


def test_public_ipv4_in_short_notation_is_connected_to_in_dotted_form() -> None:
    checked = validate_url("https://0x5d.0270.55054/mcp")
    assert checked.url == "https://93.184.215.14/mcp"


def test_name_resolving_to_public_addresses_is_allowed(dns) -> None:
    dns["mcp.example.com"] = ["93.184.215.14", "2606:4700::1111"]
    checked = validate_url("https://mcp.example.com/mcp")
    assert checked.host == "mcp.example.com"
    assert checked.addresses == ("93.184.215.14", "2606:4700::1111")


def test_unresolvable_name_is_accepted_without_addresses() -> None:
    checked = validate_url("https://does-not-exist.invalid/mcp")
    assert checked.url == "https://does-not-exist.invalid/mcp"
    assert checked.addresses == ()


def test_unresolvable_name_is_refused_when_asked() -> None:
    message = refused("https://does-not-exist.invalid/mcp", allow_unresolvable=False)
    assert message == "does-not-exist.invalid does not resolve"


def test_names_are_not_resolved_when_resolution_is_off(monkeypatch) -> None:
    def must_not_resolve(host: str, port: int) -> list[str]:
        raise AssertionError("resolve_host called")

    monkeypatch.setattr(urlpolicy, "resolve_host", must_not_resolve)
    assert validate_url("https://mcp.example.com/mcp", resolve=False).addresses == ()
    assert "loopback" in refused("https://localhost/", resolve=False)


def test_loopback_is_allowed_for_development(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    checked = validate_url("http://127.0.0.1:8123/mcp")
    assert checked == CheckedUrl(
        url="http://127.0.0.1:8123/mcp", scheme="http", host="127.0.0.1", port=8123, addresses=("127.0.0.1",)
    )


def test_localhost_must_have_both_loopback_addresses_allowed(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    assert refused("https://localhost/") == "localhost resolves to ::1, a loopback address" + FIX
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    assert validate_url("https://localhost:8443/").addresses == ("127.0.0.1", "::1")


def test_private_network_can_be_allowed(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    assert validate_url("https://10.1.2.3/mcp").addresses == ("10.1.2.3",)
    assert "192.168.0.1 is a private address" in refused("https://192.168.0.1/mcp")


def test_ipv6_loopback_with_port_can_be_allowed(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["::1/128"]
    checked = validate_url("https://[::1]:8443/mcp")
    assert (checked.url, checked.host, checked.port) == ("https://[::1]:8443/mcp", "::1", 8443)


def test_no_scheme_allowed_says_so(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = []
    assert refused("https://example.com/") == "https URLs are not allowed; allowed schemes: none"


def test_unknown_scheme_in_settings_is_not_honoured(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["HTTPS", "ftp"]
    assert refused("ftp://example.com/") == "ftp URLs are not allowed; allowed schemes: https"
    assert validate_url("https://93.184.215.14/").scheme == "https"


@pytest.mark.parametrize("networks", [["169.254.0.0/16"], ["0.0.0.0/0"], ["::/0"], ["0.0.0.0/0", "::/0"]])
@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/",
        "https://[::ffff:169.254.169.254]/",
        "https://[64:ff9b::a9fe:a9fe]/",
        "https://[2002:a9fe:a9fe::]/",
        "https://169.254.170.2/",
        "https://169.254.169.253/",
        "https://100.100.100.200/",
        "https://192.0.0.192/",
        "https://[fd00:ec2::254]/",
        "https://[fd00:ec2::23]/",
        "https://metadata.google.internal/",
        "https://metadata.goog/",
        "https://instance-data/",
    ],
)
def test_metadata_is_refused_even_when_its_network_is_allowed(settings, networks: list[str], url: str) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = networks
    assert "is always refused" in refused(url)


# --- normalisation -------------------------------------------------------------------------------------------------


def test_scheme_host_trailing_dot_and_default_port_are_normalised() -> None:
    checked = validate_url("HTTPS://MCP.Example.COM.:443/mcp", resolve=False)
    assert checked == CheckedUrl(
        url="https://mcp.example.com/mcp", scheme="https", host="mcp.example.com", port=443, addresses=()
    )


def test_international_host_is_idna_encoded() -> None:
    checked = validate_url("https://bücher.example/mcp", resolve=False)
    assert checked.host == "xn--bcher-kva.example"
    assert checked.url == "https://xn--bcher-kva.example/mcp"


def test_already_encoded_host_is_kept() -> None:
    assert validate_url("https://XN--BCHER-KVA.example/", resolve=False).host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://mcp.example.com", "https://mcp.example.com/"),
        ("https://mcp.example.com?x=1", "https://mcp.example.com/?x=1"),
        ("https://mcp.example.com/a/b?x=1&y=%20", "https://mcp.example.com/a/b?x=1&y=%20"),
        ("https://mcp.example.com/mcp?", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/büro?q=ä", "https://mcp.example.com/b%C3%BCro?q=%C3%A4"),
        ("https://mcp.example.com/@me", "https://mcp.example.com/@me"),
        ("https://mcp.example.com:8443/mcp", "https://mcp.example.com:8443/mcp"),
        ("https://mcp.example.com:00443/mcp", "https://mcp.example.com/mcp"),
    ],
)
def test_path_query_and_port_are_kept(url: str, expected: str) -> None:
    assert validate_url(url, resolve=False).url == expected


def test_http_default_port_is_dropped(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["http"]
    checked = validate_url("HTTP://mcp.example.com:80", resolve=False)
    assert (checked.url, checked.port) == ("http://mcp.example.com/", 80)


def test_url_of_exactly_the_maximum_length_is_accepted() -> None:
    url = "https://mcp.example.com/" + "a" * (2048 - len("https://mcp.example.com/"))
    assert validate_url(url, resolve=False).url == url


def test_non_string_is_refused() -> None:
    assert refused(None) == "URL is empty"  # type: ignore[arg-type]


def test_refusal_is_a_value_error() -> None:
    assert issubclass(UrlPolicyError, ValueError)


# --- check_address -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [
        "93.184.215.14",
        ipaddress.ip_address("8.8.8.8"),
        "2606:4700::1111",
        ipaddress.ip_address("2606:4700:4700::1001"),
        "::ffff:93.184.215.14",
        "64:ff9b::5db8:d70e",
        "2002:5db8:d70e::1",
    ],
)
def test_check_address_accepts_public_addresses(ip) -> None:
    assert check_address(ip) is None


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", LOOPBACK),
        (ipaddress.ip_address("127.0.0.1"), LOOPBACK),
        ("::1", "::1 is a loopback address" + FIX),
        ("::ffff:127.0.0.1", WRAPPED_LOOPBACK),
        ("10.9.8.7", "10.9.8.7 is a private address" + FIX),
        ("fe80::1%eth0", "fe80::1 is a link-local address" + FIX),
        (ipaddress.ip_address("fe80::2%2"), "fe80::2 is a link-local address" + FIX),
        ("0.0.0.0", "0.0.0.0 is an unspecified address" + FIX),
        ("239.1.2.3", "239.1.2.3 is a multicast address" + FIX),
        ("ff0e::1", "ff0e::1 is a multicast address" + FIX),
        ("100.64.0.1", "100.64.0.1 is not a public address" + FIX),
        ("::8.8.8.8", "::808:808 (8.8.8.8) is a reserved address" + FIX),
        ("::ffff:0.0.0.0", "(0.0.0.0) is an unspecified address" + FIX),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "(192.0.2.45) is not a public address" + FIX),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "(127.0.0.1) is a loopback address" + FIX),
        ("2001:0:4136:e378:8000:63bf:a2a5:2af1", "(93.90.213.14) is not a public address" + FIX),
        ("169.254.169.254", METADATA),
        ("169.254.170.2", "169.254.170.2 is a cloud metadata address and is always refused"),
        ("fd00:ec2::254", "fd00:ec2::254 is a cloud metadata address and is always refused"),
        ("fd00:ec2::23", "fd00:ec2::23 is a cloud metadata address and is always refused"),
        ("::ffff:169.254.169.254", "::ffff:a9fe:a9fe (169.254.169.254) is a cloud metadata address"),
        ("not-an-ip", "not-an-ip is not a valid IP address"),
        ("127.1", "127.1 is not a valid IP address"),
    ],
)
def test_check_address_refuses(ip, expected: str) -> None:
    with pytest.raises(UrlPolicyError) as info:
        check_address(ip)
    assert expected in str(info.value)


def test_check_address_names_the_host_it_resolved() -> None:
    with pytest.raises(UrlPolicyError, match=r"^api\.example resolves to 192\.168\.0\.9, a private address; add it"):
        check_address("192.168.0.9", host="api.example")


@pytest.mark.parametrize(
    ("networks", "ip"),
    [
        (["127.0.0.0/8"], "127.0.0.1"),
        (["127.0.0.0/8"], "::ffff:127.0.0.1"),
        (["::ffff:0:0/96"], "::ffff:127.0.0.1"),
        (["fe80::/10"], "fe80::1%eth0"),
        (["::/0"], "::1"),
        (["0.0.0.0/0"], "10.0.0.1"),
        (["10.0.0.0/8", "::1/128"], "::1"),
    ],
)
def test_check_address_honours_allowed_networks(settings, networks: list[str], ip: str) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = networks
    assert check_address(ip) is None


def test_allowed_networks_of_the_other_family_do_not_match(settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["::/0"]
    with pytest.raises(UrlPolicyError, match="is a loopback address"):
        check_address("127.0.0.1")


# --- resolve_host --------------------------------------------------------------------------------------------------


def test_resolve_host_returns_unique_addresses() -> None:
    addresses = resolve_host("localhost", 443)
    assert "127.0.0.1" in addresses or "::1" in addresses
    assert len(addresses) == len(set(addresses))


def test_resolve_host_passes_literals_through() -> None:
    assert resolve_host("127.0.0.1", 80) == ["127.0.0.1"]


def test_resolve_host_raises_gaierror_for_unknown_names() -> None:
    with pytest.raises(socket.gaierror):
        resolve_host("does-not-exist.invalid", 443)
