"""A canary secret registered under every auth type must never come back out."""

from __future__ import annotations

import json
import logging

import pytest
import trustme
from django.db import connection

from external_mcp.models import AuditEvent, ExternalMcpCredential, ExternalMcpServer, ExternalMcpTool

URL = "/api/v1/external-mcp/servers/"
CANARY = "canary-Zq9-secret"


def canary_payloads() -> dict[str, dict[str, str]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    return {
        "api_key": {"header": "X-Api-Key", "value": CANARY},
        "basic": {"username": "svc", "password": CANARY},
        "bearer": {"token": CANARY},
        "oauth2_client_credentials": {"client_id": "twinmcp", "client_secret": CANARY},
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


@pytest.mark.parametrize("auth_type", ["api_key", "basic", "bearer", "mtls", "oauth2_client_credentials"])
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


def test_canary_never_leaks_through_hostile_input(admin, flag_on, admin_web, caplog, settings):
    """The secret sent inside bad input — deep JSON, NULs, invalid UTF-8, an oversized body, a form
    field, a move to another host with and without it — comes back in no answer, log or row."""
    caplog.set_level(logging.DEBUG)
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    client = admin.client()
    created = client.post(URL, {"name": "c", "base_url": "https://93.184.215.14/mcp", "auth_type": "bearer",
                                "credentials": {"token": CANARY}}, format="json")
    assert created.status_code == 201
    server_url = f"{URL}{created.json()['id']}/"
    deep = "[" * 100_000 + json.dumps(CANARY) + "]" * 100_000
    nested_secret = json.dumps({"credentials": {"token": [[[[CANARY]]]]}})
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = len(deep) + 100
    answers = [
        client.generic("POST", URL, deep, content_type="application/json"),
        client.generic("PUT", f"{server_url}credentials/", deep, content_type="application/json"),
        client.generic("PUT", f"{server_url}credentials/", nested_secret, content_type="application/json"),
        client.put(f"{server_url}credentials/", {"credentials": {"token": CANARY + "\x00"}}, format="json"),
        client.put(f"{server_url}credentials/", {"credentials": {"token": CANARY + "\r\nX: 1"}}, format="json"),
        client.generic("PUT", f"{server_url}credentials/",
                       b'{"credentials": {"token": "' + CANARY.encode() + b'\xff"}}', content_type="application/json"),
        client.generic("PUT", f"{server_url}credentials/", '{"credentials": {"token": "' + CANARY + '"',
                       content_type="application/json"),
        client.put(f"{server_url}credentials/", {"credentials": "[" * 5000 + json.dumps({"token": CANARY})},
                   format="multipart"),
        client.generic("PUT", f"{server_url}credentials/",
                       json.dumps({"credentials": {"token": CANARY}, "pad": "p" * len(deep)}),
                       content_type="application/json"),
        client.generic("PUT", f"{server_url}credentials/",
                       "credentials=" + CANARY + "&pad=" + "p" * len(deep),
                       content_type="application/x-www-form-urlencoded"),
        client.patch(server_url, {"base_url": "https://93.184.215.15/mcp"}, format="json"),
        client.patch(server_url, {"base_url": "https://93.184.215.15/mcp", "credentials": {"tok": CANARY}},
                     format="json"),
        client.patch(server_url, {"base_url": "https://93.184.215.15/mcp", "credentials": {"token": CANARY}},
                     format="json"),
        client.get(URL, {"limit": "9" * 30, "search": CANARY + "\x00"}),
        client.get(f"{URL}{CANARY}/"),
        admin_web.post(f"/servers/{created.json()['id']}/edit/",
                       {"name": "c", "base_url": "https://93.184.215.16/mcp", "auth_type": "bearer",
                        "cred-token": CANARY + "\x00"}),
        admin_web.post(f"/servers/{created.json()['id']}/edit/",
                       {"name": "c", "base_url": "https://93.184.215.16/mcp", "auth_type": "bearer"}),
        client.get(server_url),
        client.get(f"{server_url}tools/"),
    ]
    assert all(answer.status_code < 500 for answer in answers), [a.status_code for a in answers]
    outputs = [answer.content.decode(errors="replace") for answer in answers]
    outputs += [caplog.text, repr(list(AuditEvent.objects.values()))]
    with connection.cursor() as cursor:
        for model in (ExternalMcpCredential, ExternalMcpServer, ExternalMcpTool):
            cursor.execute(f"SELECT * FROM {model._meta.db_table}")  # noqa: S608 - model tables
            outputs.append(repr(cursor.fetchall()))
    for text in outputs:
        assert CANARY not in text
