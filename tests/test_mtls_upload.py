from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trustme

URL = "/api/v1/external-mcp/servers/"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pems(cert: trustme.LeafCert) -> tuple[str, str]:
    return cert.cert_chain_pems[0].bytes().decode(), cert.private_key_pem.bytes().decode()


def post(actor, credentials):
    return actor.client().post(
        URL,
        {"name": "tls", "base_url": "https://93.184.215.14/mcp", "auth_type": "mtls", "credentials": credentials},
        format="json",
    )


def test_valid_client_certificate_is_stored_with_metadata(admin, flag_on, ca):
    cert, key = pems(ca.issue_cert("client@example.com", common_name="agent-client"))
    bundle = ca.cert_pem.bytes().decode()
    response = post(admin, {"client_cert_pem": cert, "client_key_pem": key, "ca_bundle_pem": bundle})
    assert response.status_code == 201, response.json()
    meta = response.json()["credential"]
    assert "agent-client" in meta["cert_subject"]
    assert meta["cert_issuer"] and meta["cert_not_after"]
    assert "PRIVATE KEY" not in response.content.decode()


def test_key_that_does_not_match_is_refused(admin, flag_on, ca):
    cert, _ = pems(ca.issue_cert("a.example"))
    _, other_key = pems(ca.issue_cert("b.example"))
    response = post(admin, {"client_cert_pem": cert, "client_key_pem": other_key})
    assert response.status_code == 400
    assert response.json()["credentials.client_key_pem"] == ["The private key does not match the certificate."]


def test_expired_certificate_is_refused(admin, flag_on, ca):
    now = datetime.now(UTC)
    leaf = ca.issue_cert("old.example", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    cert, key = pems(leaf)
    response = post(admin, {"client_cert_pem": cert, "client_key_pem": key})
    assert response.status_code == 400
    assert "expired" in response.json()["credentials.client_cert_pem"][0]


@pytest.mark.parametrize(
    ("mutate", "field", "phrase"),
    [
        (lambda c, k, b: (c, k, "garbage"), "credentials.ca_bundle_pem", "PEM bundle"),
        (lambda c, k, b: ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", k, b),
         "credentials.client_cert_pem", "X.509"),
        (lambda c, k, b: (c, "not a key", b), "credentials.client_key_pem", "private key"),
        (lambda c, k, b: (c + "x" * 70000, k, b), "credentials.client_cert_pem", "64 KiB"),
    ],
)
def test_bad_uploads_say_which_part(admin, flag_on, ca, mutate, field, phrase):
    cert, key = pems(ca.issue_cert("c.example"))
    c, k, b = mutate(cert, key, ca.cert_pem.bytes().decode())
    response = post(admin, {"client_cert_pem": c, "client_key_pem": k, "ca_bundle_pem": b})
    assert response.status_code == 400
    assert phrase in response.json()[field][0]


def test_password_protected_key_is_refused(admin, flag_on, ca):
    from cryptography.hazmat.primitives import serialization

    leaf = ca.issue_cert("d.example")
    cert, key = pems(leaf)
    private = serialization.load_pem_private_key(key.encode(), password=None)
    encrypted = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    response = post(admin, {"client_cert_pem": cert, "client_key_pem": encrypted})
    assert response.status_code == 400
    assert "password-protected" in response.json()["credentials.client_key_pem"][0]
