"""The mTLS part of the add/edit form: every problem reported at once, the parts that passed kept
across the re-render (encrypted, bound to the user, short-lived), and PEMs pasted as well as uploaded."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
import trustme
from django.core.files.uploadedfile import SimpleUploadedFile

from external_mcp import pem_checks
from external_mcp.models import ExternalMcpCredential, ExternalMcpServer
from tests import mcp_peers


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def leaf(ca: trustme.CA, name: str = "client.example", **kwargs) -> tuple[bytes, bytes]:
    cert = ca.issue_cert(name, **kwargs)
    return cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()


def add(client, **data):
    payload = {"name": "m", "base_url": "https://93.184.215.14/mcp", "description": "", "tags": "",
               "auth_type": "mtls", **data}
    return client.post("/servers/new/", payload)


def upload(name: str, body: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, body)


def error_of(page: str, field: str) -> str:
    match = re.search(rf'<ul class="errorlist" id="id_cred-{field}_error">(.*?)</ul>', page, re.S)
    return match.group(1) if match else ""


def key_line(key: bytes) -> str:
    return key.decode().splitlines()[1][:40]


def kept_token(page: str) -> str:
    return re.search(r'<input type="hidden" name="cred-kept" value="([^"]+)">', page).group(1)


def test_every_mtls_problem_is_reported_in_one_response(admin_web):
    response = add(admin_web, **{"cred-client_cert_pem_text": "not a certificate",
                                 "cred-client_key_pem": upload("client.key", b"not a key"),
                                 "cred-ca_bundle_pem_text": "not a bundle"})
    page = response.content.decode()
    assert response.status_code == 400
    assert "X.509" in error_of(page, "client_cert_pem")
    assert "private key" in error_of(page, "client_key_pem")
    assert "PEM bundle" in error_of(page, "ca_bundle_pem")


def test_a_mismatched_key_and_a_bad_bundle_are_both_reported(admin_web, ca):
    cert, _ = leaf(ca)
    _, other_key = leaf(ca, "other.example")
    response = add(admin_web, **{"cred-client_cert_pem": upload("client.pem", cert),
                                 "cred-client_key_pem": upload("other.key", other_key),
                                 "cred-ca_bundle_pem": upload("ca.pem", b"garbage")})
    page = response.content.decode()
    assert "does not match" in error_of(page, "client_key_pem") and "PEM bundle" in error_of(page, "ca_bundle_pem")
    assert key_line(other_key) not in page


def test_an_expired_certificate_and_a_bad_key_are_both_reported(admin_web, ca):
    now = datetime.now(UTC)
    cert, _ = leaf(ca, "old.example", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    page = add(admin_web, **{"cred-client_cert_pem": upload("old.pem", cert),
                             "cred-client_key_pem_text": "nope"}).content.decode()
    assert "expired" in error_of(page, "client_cert_pem") and "private key" in error_of(page, "client_key_pem")


def test_valid_files_are_kept_after_an_error_without_the_key_in_clear(admin_web, ca):
    cert, key = leaf(ca)
    response = add(admin_web, name="", **{"cred-client_cert_pem": upload("client.pem", cert),
                                          "cred-client_key_pem": upload("client.key", key),
                                          "cred-ca_bundle_pem": upload("ca.pem", ca.cert_pem.bytes())})
    page = response.content.decode()
    assert response.status_code == 400 and 'id="id_name_error"' in page
    assert "client.key kept — choose another file to replace it." in page
    assert "client.pem kept" in page and "ca.pem kept" in page
    assert key_line(key) not in page and "PRIVATE KEY" not in page
    again = add(admin_web, name="m", **{"cred-kept": kept_token(page)})
    assert again.status_code == 302, again.content.decode()[:2000]
    credential = ExternalMcpCredential.objects.get(server__name="m")
    assert "client.example" in credential.cert_subject or credential.cert_not_after


def test_only_the_parts_that_passed_are_kept_and_a_new_file_replaces_a_kept_one(admin_web, ca):
    cert, key = leaf(ca)
    _, other_key = leaf(ca, "other.example")
    first = add(admin_web, **{"cred-client_cert_pem": upload("client.pem", cert),
                              "cred-client_key_pem": upload("other.key", other_key)}).content.decode()
    assert "client.pem kept" in first and "other.key kept" not in first
    fixed = add(admin_web, **{"cred-kept": kept_token(first), "cred-client_key_pem": upload("client.key", key)})
    assert fixed.status_code == 302
    replaced = add(admin_web, name="m2", **{"cred-kept": kept_token(first),
                                            "cred-client_cert_pem": upload("x.pem", b"garbage"),
                                            "cred-client_key_pem": upload("client.key", key)})
    assert replaced.status_code == 400 and "X.509" in error_of(replaced.content.decode(), "client_cert_pem")


def test_a_kept_token_is_bound_to_its_user_and_expires(admin, outsider, ca):
    cert, _ = leaf(ca)
    token = pem_checks.keep({"client_cert_pem": pem_checks.Pem(text=cert.decode(), name="c.pem")}, owner=admin.user)
    assert pem_checks.kept(token, owner=admin.user)["client_cert_pem"].name == "c.pem"
    assert pem_checks.kept(token, owner=outsider.user) == {}
    assert pem_checks.kept(token[:-4] + "AAAA", owner=admin.user) == {}
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=pem_checks.KEPT_SECONDS + 60)):
        assert pem_checks.kept(token, owner=admin.user) == {}


def test_another_users_token_keeps_nothing(outsider_web, admin, ca):
    cert, key = leaf(ca)
    parts = {"client_cert_pem": pem_checks.Pem(text=cert.decode(), name="c.pem"),
             "client_key_pem": pem_checks.Pem(text=key.decode(), name="c.key")}
    response = add(outsider_web, **{"cred-kept": pem_checks.keep(parts, owner=admin.user)})
    assert response.status_code == 400 and "required" in error_of(response.content.decode(), "client_cert_pem")
    assert ExternalMcpServer.objects.count() == 0


def test_pems_can_be_pasted_and_are_never_echoed(admin_web, ca):
    cert, key = leaf(ca)
    failed = add(admin_web, name="", **{"cred-client_cert_pem_text": cert.decode(),
                                        "cred-client_key_pem_text": key.decode()}).content.decode()
    assert key_line(key) not in failed and "pasted private key kept" in failed
    saved = add(admin_web, **{"cred-client_cert_pem_text": cert.decode(), "cred-client_key_pem_text": key.decode(),
                              "cred-ca_bundle_pem_text": ca.cert_pem.bytes().decode()})
    assert saved.status_code == 302
    assert ExternalMcpCredential.objects.get(server__name="m").cert_not_after is not None


def test_a_pem_is_uploaded_or_pasted_not_both(admin_web, ca):
    cert, key = leaf(ca)
    page = add(admin_web, **{"cred-client_cert_pem": upload("client.pem", cert),
                             "cred-client_cert_pem_text": cert.decode(),
                             "cred-client_key_pem": upload("client.key", key)}).content.decode()
    assert "not both" in page and ExternalMcpServer.objects.count() == 0


def test_the_form_offers_a_textarea_per_pem(admin_web):
    page = admin_web.get("/servers/new/?auth_type=mtls", HTTP_HX_REQUEST="true",
                         HTTP_HX_TRIGGER_NAME="auth_type").content.decode()
    for name in ("client_cert_pem", "client_key_pem", "ca_bundle_pem"):
        assert f'<textarea name="cred-{name}_text"' in page, name


def test_pasted_pems_are_used_by_test_before_save(admin_web, settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS = 30_000
    settings.EXTERNAL_MCP_HEALTH_SLOW_MS = 30_000
    with mcp_peers.mtls_peer() as peer:
        data = {"name": "m", "base_url": peer.url, "auth_type": "mtls",
                "cred-client_cert_pem_text": peer.client_cert_pem, "cred-client_key_pem_text": peer.client_key_pem,
                "cred-ca_bundle_pem_text": peer.ca_pem}
        response = admin_web.post("/servers/new/test/", data, HTTP_HX_REQUEST="true")
        without_cert = admin_web.post("/servers/new/test/", {**data, "cred-client_cert_pem_text": "",
                                                             "cred-client_key_pem_text": ""},
                                      HTTP_HX_REQUEST="true")
    assert 'data-ok="true"' in response.content.decode(), response.content.decode()
    assert 'href="#id_cred-client_cert_pem"' in without_cert.content.decode()
    assert ExternalMcpServer.objects.count() == 0
