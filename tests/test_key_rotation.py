from __future__ import annotations

import base64
import io
import os

import pytest
from django.core.management import call_command

from external_mcp import services
from external_mcp.models import AuditEvent, ExternalMcpCredential, ExternalMcpServer


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def rotate() -> str:
    out = io.StringIO()
    call_command("rotate_encryption_keys", "--batch-size", "2", stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


@pytest.fixture
def servers(admin, settings):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a := new_key()]
    created = [
        services.server_create(workspace=admin.workspace, actor=admin.user, name=f"s{i}",
                               base_url="https://93.184.215.14/mcp", auth_type="bearer",
                               credentials={"token": f"token-{i}"})
        for i in range(5)
    ]
    return key_a, created


def test_add_key_first_rotate_then_drop_old_key(servers, settings):
    key_a, created = servers
    key_b = new_key()
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    assert rotate() == "re-encrypted 5 credential(s); 0 still use an old key"
    assert rotate() == "re-encrypted 0 credential(s); 0 still use an old key"
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    for i, server in enumerate(created):
        assert services.credentials_payload(server=server) == {"token": f"token-{i}"}
    assert AuditEvent.objects.filter(action="credentials.reencrypt").count() == 5


def test_credential_no_key_can_decrypt_marks_the_server(servers, settings):
    _, created = servers
    settings.TWINMCP_ENCRYPTION_KEYS = [new_key()]
    with pytest.raises(services.CredentialUnavailable) as exc:
        services.credentials_payload(server=created[0])
    assert "cannot be decrypted" in str(exc.value)
    server = ExternalMcpServer.objects.get(pk=created[0].pk)
    assert "not in TWINMCP_ENCRYPTION_KEYS" in server.error_message
    assert rotate() == "re-encrypted 0 credential(s); 5 still use an old key"
    assert AuditEvent.objects.filter(action="credentials.decrypt_failed").count() == 5


def test_rotating_the_secret_clears_the_decryption_error(servers, settings, admin):
    _, created = servers
    settings.TWINMCP_ENCRYPTION_KEYS = [new_key()]
    with pytest.raises(services.CredentialUnavailable):
        services.credentials_payload(server=created[0])
    services.credentials_rotate(server=created[0], actor=admin.user, credentials={"token": "fresh"})
    server = ExternalMcpServer.objects.get(pk=created[0].pk)
    assert server.error_message == ""
    assert services.credentials_payload(server=server) == {"token": "fresh"}


def test_ciphertext_is_bound_to_its_server(servers):
    _, created = servers
    first, second = (ExternalMcpCredential.objects.get(server=s) for s in created[:2])
    ExternalMcpCredential.objects.filter(pk=second.pk).update(ciphertext=first.ciphertext)
    with pytest.raises(services.CredentialUnavailable):
        services.credentials_payload(server=created[1])


def test_missing_credential_row_is_a_clear_error(servers):
    _, created = servers
    ExternalMcpCredential.objects.filter(server=created[0]).delete()
    with pytest.raises(services.CredentialUnavailable, match="No credentials"):
        services.credentials_payload(server=created[0])
    assert services.credentials_payload(server=ExternalMcpServer(auth_type="none")) is None


def test_every_stored_secret_is_reencrypted_connections_and_oauth_included(admin, member, settings):
    """Connections (tokens, members' own secrets), registered OAuth clients, pending authorizations
    and queued revocations are secrets too: one rotation covers them all."""
    from datetime import timedelta

    from django.utils import timezone

    from external_mcp import connections, crypto
    from external_mcp.models import Connection, OAuthClient, OAuthPending, OAuthRevocation

    settings.TWINMCP_ENCRYPTION_KEYS = [key_a := new_key()]
    oauth = services.server_create(workspace=admin.workspace, actor=admin.user, name="o",
                                   base_url="https://93.184.215.14/mcp", auth_type="oauth2")
    own = services.server_create(workspace=admin.workspace, actor=admin.user, name="p",
                                 base_url="https://93.184.215.15/mcp", auth_type="bearer", credential_mode="per_user")
    connections.connection_save_tokens(server=oauth, user=admin.user, own=False, access_token="access-1",
                                       refresh_token="refresh-1", expires_at=None, scope="mcp")
    connections.connection_save_secret(server=own, user=member.user, credentials={"token": "member-token"})
    client = OAuthClient(server=oauth, issuer="https://as.example", resource="https://93.184.215.14/mcp",
                         metadata={}, key_id=crypto.current_key_id())
    client.registration = crypto.encrypt(b'{"client_id": "c"}', context=client.context)
    client.save()
    pending = OAuthPending(state_hash="h" * 64, server=oauth, user=admin.user, own=False,
                           key_id=crypto.current_key_id(), expires_at=timezone.now() + timedelta(minutes=5))
    pending.verifier = crypto.encrypt(b"verifier", context=pending.context)
    pending.save()
    revocation = OAuthRevocation(key_id=crypto.current_key_id())
    revocation.ciphertext = crypto.encrypt_json({"tokens": []}, context=revocation.context)
    revocation.save()
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b := new_key(), key_a]
    assert rotate() == "re-encrypted 5 credential(s); 0 still use an old key"  # oauth2 with no client: no credential
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    payloads = {crypto.decrypt_json(row.ciphertext, context=row.context)["access_token" if row.user_id is None
                                                                          else "token"]
                for row in Connection.objects.all()}
    assert payloads == {"access-1", "member-token"}
    client.refresh_from_db()
    pending.refresh_from_db()
    revocation.refresh_from_db()
    assert crypto.decrypt(client.registration, context=client.context) == b'{"client_id": "c"}'
    assert crypto.decrypt(pending.verifier, context=pending.context) == b"verifier"
    assert crypto.decrypt_json(revocation.ciphertext, context=revocation.context) == {"tokens": []}
