"""A canary secret registered under every auth type must never come back out."""

from __future__ import annotations

import logging

import pytest
import trustme
from django.db import connection

from external_mcp.models import AuditEvent, ExternalMcpCredential

URL = "/api/v1/external-mcp/servers/"
CANARY = "canary-Zq9-secret"


def canary_payloads() -> dict[str, dict[str, str]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    return {
        "api_key": {"header": "X-Api-Key", "value": CANARY},
        "basic": {"username": "svc", "password": CANARY},
        "bearer": {"token": CANARY},
        "mtls": {
            "client_cert_pem": leaf.cert_chain_pems[0].bytes().decode(),
            "client_key_pem": leaf.private_key_pem.bytes().decode(),
        },
    }


def secret_markers(auth_type: str, payload: dict[str, str]) -> list[str]:
    if auth_type == "mtls":
        body = payload["client_key_pem"].splitlines()[1]
        return [body[:40]]
    return [CANARY]


@pytest.mark.parametrize("auth_type", ["api_key", "basic", "bearer", "mtls"])
def test_canary_never_leaks(admin, flag_on, admin_client, caplog, auth_type):
    caplog.set_level(logging.DEBUG)
    payload = canary_payloads()[auth_type]
    markers = secret_markers(auth_type, payload)
    client = admin.client()
    created = client.post(URL, {"name": "c", "base_url": "https://93.184.215.14/mcp", "auth_type": auth_type,
                                "credentials": payload}, format="json")
    assert created.status_code == 201
    server_id = created.json()["id"]
    rotated = client.put(f"{URL}{server_id}/credentials/", {"credentials": payload}, format="json")
    bad = client.put(f"{URL}{server_id}/credentials/", {"credentials": {**payload, "oops": CANARY}}, format="json")
    assert bad.status_code == 400
    outputs = [
        created.content.decode(),
        rotated.content.decode(),
        bad.content.decode(),
        client.get(URL).content.decode(),
        client.get(f"{URL}{server_id}/").content.decode(),
        client.get("/api/schema/").content.decode(),
        admin_client.get("/admin/external_mcp/externalmcpserver/").content.decode(),
        admin_client.get(f"/admin/external_mcp/externalmcpserver/{server_id}/change/").content.decode(),
        admin_client.get("/admin/external_mcp/auditevent/").content.decode(),
        caplog.text,
        repr(list(AuditEvent.objects.values())),
    ]
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM external_mcp_credentials")
        outputs.append(repr(cursor.fetchall()))
        cursor.execute("SELECT * FROM external_mcp_servers")
        outputs.append(repr(cursor.fetchall()))
    for marker in markers:
        for text in outputs:
            assert marker not in text
    assert ExternalMcpCredential.objects.get(server_id=server_id).ciphertext.startswith("v1.")
