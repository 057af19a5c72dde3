"""Credential encryption at rest: round trips, key rotation, context binding, tamper and leak checks."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from django.core.exceptions import ImproperlyConfigured

from external_mcp import crypto
from external_mcp.crypto import DecryptionError

CONTEXT = "7f1c5e0a-2b4d-4c8e-9a61-3d2f8b9e4c10"
SECRET = b"sk-live-VERY-SECRET-api-key-0123456789"


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key)


def kid(key: str) -> str:
    return crypto.key_id(raw(key))


@pytest.fixture
def key_a() -> str:
    return new_key()


@pytest.fixture
def key_b() -> str:
    return new_key()


@pytest.fixture
def ring(settings, key_a):
    """A one-key ring; tests that rotate change ``settings.TWINMCP_ENCRYPTION_KEYS`` themselves."""
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    return settings


def body_bytes(token: str) -> bytes:
    body = token.split(".")[2]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def assert_no_leak(message: str, *keys: str) -> None:
    assert SECRET.decode() not in message
    for key in keys:
        assert key not in message
        assert key.rstrip("=") not in message
        assert raw(key).hex() not in message
        assert repr(raw(key)) not in message


# --- key ids -------------------------------------------------------------------------------


def test_key_id_is_first_four_bytes_of_domain_separated_sha256():
    key = os.urandom(32)
    expected = hashlib.sha256(b"twinmcp-key-id:" + key).digest()[:4].hex()
    assert crypto.key_id(key) == expected
    assert len(expected) == 8
    assert crypto.key_id(key) != hashlib.sha256(key).hexdigest()[:8]


def test_current_key_id_is_the_first_key(settings, key_a, key_b):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    assert crypto.current_key_id() == kid(key_b)


# --- round trips ---------------------------------------------------------------------------


def test_bytes_round_trip(ring, key_a):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    version, token_kid, body = token.split(".")
    assert version == "v1"
    assert token_kid == kid(key_a) == crypto.token_key_id(token)
    assert "=" not in body
    assert len(body_bytes(token)) == 12 + len(SECRET) + 16
    assert crypto.decrypt(token, context=CONTEXT) == SECRET


@pytest.mark.parametrize("plaintext", [b"", b"\x00\xff" * 300, bytearray(b"bytearray"), memoryview(b"view")])
def test_round_trip_edge_payloads(ring, plaintext):
    token = crypto.encrypt(plaintext, context=CONTEXT)
    assert crypto.decrypt(token, context=CONTEXT) == bytes(plaintext)


def test_json_round_trip(ring):
    data = {"username": "svc-bot", "password": "hunter2-ünïcode", "nested": {"n": [1, 2.5, None, True]}}
    token = crypto.encrypt_json(data, context=CONTEXT)
    assert crypto.decrypt_json(token, context=CONTEXT) == data
    # Canonical: the plaintext is sorted, compact JSON.
    plain = crypto.decrypt(token, context=CONTEXT)
    assert plain == b'{"nested":{"n":[1,2.5,null,true]},"password":"hunter2-\\u00fcn\\u00efcode","username":"svc-bot"}'


def test_encrypt_json_rejects_non_dict(ring):
    with pytest.raises(TypeError):
        crypto.encrypt_json(["not", "a", "dict"], context=CONTEXT)


def test_decrypt_json_of_non_json_bytes(ring):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    with pytest.raises(DecryptionError) as exc:
        crypto.decrypt_json(token, context=CONTEXT)
    assert "not valid JSON" in str(exc.value)
    assert_no_leak(str(exc.value))


@pytest.mark.parametrize("payload", [b"\xff\xfe", b'["a list"]', b'"a string"'])
def test_decrypt_json_of_non_object(ring, payload):
    token = crypto.encrypt(payload, context=CONTEXT)
    with pytest.raises(DecryptionError):
        crypto.decrypt_json(token, context=CONTEXT)


def test_fresh_nonce_each_time(ring):
    tokens = {crypto.encrypt(SECRET, context=CONTEXT) for _ in range(20)}
    assert len(tokens) == 20
    assert len({body_bytes(t)[:12] for t in tokens}) == 20
    assert all(crypto.decrypt(t, context=CONTEXT) == SECRET for t in tokens)


def test_ciphertext_does_not_contain_plaintext(ring, key_a):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    assert SECRET.decode() not in token
    assert SECRET not in body_bytes(token)
    assert base64.urlsafe_b64encode(SECRET).decode().rstrip("=") not in token
    assert key_a.rstrip("=") not in token
    json_token = crypto.encrypt_json({"password": SECRET.decode()}, context=CONTEXT)
    assert SECRET not in body_bytes(json_token)


def test_encrypt_rejects_str_plaintext(ring):
    with pytest.raises(TypeError, match="encrypt_json"):
        crypto.encrypt(SECRET.decode(), context=CONTEXT)


@pytest.mark.parametrize(("context", "error"), [("", ValueError), (None, TypeError), (b"bytes", TypeError)])
def test_context_is_required(ring, context, error):
    with pytest.raises(error):
        crypto.encrypt(SECRET, context=context)
    token = crypto.encrypt(SECRET, context=CONTEXT)
    with pytest.raises(error):
        crypto.decrypt(token, context=context)


# --- rotation ------------------------------------------------------------------------------


def test_key_rotation_story(settings, key_a, key_b):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    old = crypto.encrypt(SECRET, context=CONTEXT)
    assert crypto.token_key_id(old) == kid(key_a)
    assert crypto.needs_rotation(old) is False

    # A new key goes in front: old tokens still decrypt, but are flagged for rotation.
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    assert crypto.decrypt(old, context=CONTEXT) == SECRET
    assert crypto.needs_rotation(old) is True
    new = crypto.reencrypt(old, context=CONTEXT)
    assert crypto.token_key_id(new) == kid(key_b)
    assert crypto.needs_rotation(new) is False
    assert crypto.decrypt(new, context=CONTEXT) == SECRET
    assert crypto.token_key_id(crypto.encrypt(b"fresh", context=CONTEXT)) == kid(key_b)

    # The old key is retired: re-encrypted rows still work, stragglers say which key they need.
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    assert crypto.decrypt(new, context=CONTEXT) == SECRET
    with pytest.raises(DecryptionError) as exc:
        crypto.decrypt(old, context=CONTEXT)
    message = str(exc.value)
    assert message == f"encrypted with key {kid(key_a)}, which is not in TWINMCP_ENCRYPTION_KEYS"
    assert_no_leak(message, key_a, key_b)
    # needs_rotation works without the old key (it only reads the header).
    assert crypto.needs_rotation(old) is True
    with pytest.raises(DecryptionError):
        crypto.reencrypt(old, context=CONTEXT)


def test_reencrypt_json_and_wrong_context(settings, key_a, key_b):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    old = crypto.encrypt_json({"token": "abc"}, context=CONTEXT)
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    with pytest.raises(DecryptionError):
        crypto.reencrypt(old, context="another-server")
    new = crypto.reencrypt(old, context=CONTEXT)
    assert crypto.decrypt_json(new, context=CONTEXT) == {"token": "abc"}


def test_reencrypt_current_token_gives_new_token(ring):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    again = crypto.reencrypt(token, context=CONTEXT)
    assert again != token
    assert crypto.token_key_id(again) == crypto.token_key_id(token)
    assert crypto.decrypt(again, context=CONTEXT) == SECRET


def test_same_key_id_different_key_material_fails_authentication(settings, key_a, key_b):
    """A token whose key id matches but whose key does not (a substituted key) fails the tag check."""
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    token = crypto.encrypt(SECRET, context=CONTEXT)
    forged = f"v1.{kid(key_b)}.{token.split('.')[2]}"
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    with pytest.raises(DecryptionError, match="could not be decrypted"):
        crypto.decrypt(forged, context=CONTEXT)


# --- integrity -----------------------------------------------------------------------------


def test_wrong_context_fails(ring, key_a):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    with pytest.raises(DecryptionError) as exc:
        crypto.decrypt(token, context="11111111-2222-3333-4444-555555555555")
    message = str(exc.value)
    assert "could not be decrypted (wrong key or tampered data)" in message
    assert_no_leak(message, key_a)


def flip(char: str) -> str:
    return "B" if char == "A" else "A"


@pytest.mark.parametrize("position", [0, 5, 16, 20, -2, -1])
def test_tampered_token_fails(ring, key_a, position):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    head, body = token.rsplit(".", 1)
    chars = list(body)
    chars[position] = flip(chars[position])
    tampered = head + "." + "".join(chars)
    assert tampered != token
    with pytest.raises(DecryptionError) as exc:
        crypto.decrypt(tampered, context=CONTEXT)
    assert_no_leak(str(exc.value), key_a)


def test_truncated_and_extended_tokens_fail(ring):
    token = crypto.encrypt(SECRET, context=CONTEXT)
    for bad in (token[:-4], token + "AAAA", token[:-1]):
        with pytest.raises(DecryptionError):
            crypto.decrypt(bad, context=CONTEXT)


def test_non_canonical_base64_is_rejected(ring):
    # 1 + 28 bytes is not a multiple of 3, so the last character carries unused low bits: an
    # edit there that leaves the bytes unchanged must still be refused.
    token = crypto.encrypt(b"x", context=CONTEXT)
    body = token.split(".")[2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    pad = "=" * (-len(body) % 4)
    same_bytes = [
        c for c in alphabet if c != body[-1] and base64.urlsafe_b64decode(body[:-1] + c + pad) == body_bytes(token)
    ]
    assert same_bytes, "expected an alternative final character that decodes to the same bytes"
    with pytest.raises(DecryptionError, match="malformed ciphertext"):
        crypto.decrypt(token[:-1] + same_bytes[0], context=CONTEXT)


def valid_kid() -> str:
    return crypto.key_id(b"\x00" * 32)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v2.x.y",
        "v1.abc",
        "v1",
        "v1..",
        "v1.a.b.c",
        "v2.{kid}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.{kid}.not base64!!",
        "v1.{kid}.====",
        "v1.{kid}.QUJD=",
        "v1.{kid}.A",
        "v1.{kid}.QUJD",
        "v1.ABCDEF12.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.abcdefg.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.{kid}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
        "v1.{kid}.AAAA+/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.{kid}.ÄAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "\x00",
    ],
)
def test_malformed_tokens_raise_decryption_error(ring, token):
    token = token.replace("{kid}", valid_kid())
    with pytest.raises(DecryptionError) as exc:
        crypto.decrypt(token, context=CONTEXT)
    assert str(exc.value) == "malformed ciphertext"
    with pytest.raises(DecryptionError):
        crypto.token_key_id(token)
    with pytest.raises(DecryptionError):
        crypto.needs_rotation(token)
    with pytest.raises(DecryptionError):
        crypto.decrypt_json(token, context=CONTEXT)
    with pytest.raises(DecryptionError):
        crypto.reencrypt(token, context=CONTEXT)


@pytest.mark.parametrize("token", [None, b"v1.abcdef12.AAAA", 12345, ["v1", "x", "y"]])
def test_non_string_tokens_raise_decryption_error(ring, token):
    with pytest.raises(DecryptionError, match="malformed ciphertext"):
        crypto.decrypt(token, context=CONTEXT)


def test_unknown_key_with_well_formed_body(ring):
    token = f"v1.{valid_kid()}." + "A" * 40
    with pytest.raises(DecryptionError, match=f"encrypted with key {valid_kid()}, which is not in"):
        crypto.decrypt(token, context=CONTEXT)


# --- ring configuration --------------------------------------------------------------------


@pytest.mark.parametrize("empty", [[], (), None, ""])
def test_empty_ring_names_the_setting(settings, empty):
    settings.TWINMCP_ENCRYPTION_KEYS = empty
    for call in (
        lambda: crypto.encrypt(SECRET, context=CONTEXT),
        lambda: crypto.decrypt("v1.abcdef12." + "A" * 40, context=CONTEXT),
        crypto.current_key_id,
    ):
        with pytest.raises(ImproperlyConfigured, match="TWINMCP_ENCRYPTION_KEYS"):
            call()


def test_missing_setting_names_the_setting(settings):
    del settings.TWINMCP_ENCRYPTION_KEYS
    with pytest.raises(ImproperlyConfigured, match="TWINMCP_ENCRYPTION_KEYS is empty"):
        crypto.encrypt(SECRET, context=CONTEXT)


@pytest.mark.parametrize("bad", ["not base64 at all!", base64.urlsafe_b64encode(b"short").decode()])
def test_invalid_key_in_ring_names_position_not_value(settings, key_a, bad):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a, bad]
    with pytest.raises(ImproperlyConfigured) as exc:
        crypto.current_key_id()
    message = str(exc.value)
    assert message.startswith("TWINMCP_ENCRYPTION_KEYS key 2: ")
    assert bad not in message
    assert key_a not in message


def test_ring_from_comma_separated_string(settings, key_a, key_b):
    settings.TWINMCP_ENCRYPTION_KEYS = f" {key_b} , {key_a},"
    assert crypto.current_key_id() == kid(key_b)
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    token = crypto.encrypt(SECRET, context=CONTEXT)
    settings.TWINMCP_ENCRYPTION_KEYS = f"{key_b},{key_a}"
    assert crypto.decrypt(token, context=CONTEXT) == SECRET


def test_duplicate_key_in_ring_is_harmless(settings, key_a, key_b):
    padded_free = key_a.rstrip("=")  # same key bytes, different spelling
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a, key_b, padded_free]
    token = crypto.encrypt(SECRET, context=CONTEXT)
    assert crypto.token_key_id(token) == kid(key_a)
    assert crypto.decrypt(token, context=CONTEXT) == SECRET


def test_key_id_collision_between_different_keys_is_refused(settings, key_a, key_b, monkeypatch):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a, key_b]
    monkeypatch.setattr(crypto, "key_id", lambda key: "deadbeef")
    crypto._parse_ring.cache_clear()
    try:
        with pytest.raises(ImproperlyConfigured) as exc:
            crypto.current_key_id()
    finally:
        monkeypatch.undo()
        crypto._parse_ring.cache_clear()
    message = str(exc.value)
    assert "key 2 has the same key id deadbeef" in message
    assert key_a not in message and key_b not in message


def test_ring_cache_picks_up_changes_and_reuses_parsed_ring(settings, key_a, key_b):
    crypto._parse_ring.cache_clear()
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    assert crypto.current_key_id() == kid(key_a)
    token_a = crypto.encrypt(SECRET, context=CONTEXT)
    crypto.decrypt(token_a, context=CONTEXT)
    info = crypto._parse_ring.cache_info()
    assert info.misses == 1 and info.hits == 2  # parsed once, reused by encrypt and decrypt

    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    assert crypto.current_key_id() == kid(key_b)
    assert crypto.token_key_id(crypto.encrypt(SECRET, context=CONTEXT)) == kid(key_b)
    with pytest.raises(DecryptionError):
        crypto.decrypt(token_a, context=CONTEXT)

    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    assert crypto.decrypt(token_a, context=CONTEXT) == SECRET
    assert crypto._parse_ring.cache_info().misses == 2  # the [key_a] ring came back from the cache
    # A list and a tuple with the same keys share one cache entry.
    settings.TWINMCP_ENCRYPTION_KEYS = (key_a,)
    crypto.current_key_id()
    assert crypto._parse_ring.cache_info().misses == 2


def test_ring_objects_are_reused(settings, key_a):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    assert crypto._ring() is crypto._ring()


# --- leak checks ---------------------------------------------------------------------------


def check_no_leak(call, *keys: str) -> None:
    with pytest.raises(DecryptionError) as exc:
        call()
    assert_no_leak(str(exc.value), *keys)
    assert_no_leak(repr(exc.value), *keys)
    # No chained exception carrying details (InvalidTag, json errors quoting the plaintext).
    assert exc.value.__cause__ is None
    assert exc.value.__suppress_context__ or exc.value.__context__ is None


def test_error_messages_never_contain_plaintext_or_keys(settings, key_a, key_b):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    token = crypto.encrypt(SECRET, context=CONTEXT)
    json_token = crypto.encrypt_json({"password": SECRET.decode()}, context=CONTEXT)

    settings.TWINMCP_ENCRYPTION_KEYS = [key_b]
    check_no_leak(lambda: crypto.decrypt(token, context=CONTEXT), key_a, key_b)
    check_no_leak(lambda: crypto.decrypt(f"v1.{kid(key_b)}.{token.split('.')[2]}", context=CONTEXT), key_a, key_b)
    check_no_leak(lambda: crypto.decrypt_json(json_token, context=CONTEXT), key_a, key_b)
    check_no_leak(lambda: crypto.decrypt(token[:-3], context=CONTEXT), key_a, key_b)

    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    check_no_leak(lambda: crypto.decrypt(token, context="other"), key_a, key_b)
    check_no_leak(lambda: crypto.decrypt_json(token, context=CONTEXT), key_a, key_b)
    list_token = crypto.encrypt(b'["' + SECRET + b'"]', context=CONTEXT)
    check_no_leak(lambda: crypto.decrypt_json(list_token, context=CONTEXT), key_a, key_b)


# --- fingerprints --------------------------------------------------------------------------


def test_fingerprint_format_and_definition(settings):
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    settings.SECRET_KEY = "test-secret-key-for-fingerprints-" + "x" * 20
    fkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"twinmcp-credential-fingerprint").derive(
        settings.SECRET_KEY.encode()
    )
    expected = "sha256:" + hmac.new(fkey, SECRET, hashlib.sha256).hexdigest()[:16]
    assert crypto.fingerprint(SECRET) == expected
    assert len(expected) == len("sha256:") + 16
    # Not a plain hash of the secret: guessing needs the server's SECRET_KEY.
    assert crypto.fingerprint(SECRET) != "sha256:" + hashlib.sha256(SECRET).hexdigest()[:16]
    assert SECRET.decode() not in crypto.fingerprint(SECRET)


def test_fingerprint_stable_across_ring_changes(settings, key_a, key_b):
    data = {"username": "svc", "password": "pw"}
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a]
    before = (crypto.fingerprint(SECRET), crypto.fingerprint(data), crypto.fingerprint("text"))
    settings.TWINMCP_ENCRYPTION_KEYS = [key_b, key_a]
    assert (crypto.fingerprint(SECRET), crypto.fingerprint(data), crypto.fingerprint("text")) == before
    settings.TWINMCP_ENCRYPTION_KEYS = []
    assert crypto.fingerprint(SECRET) == before[0]


def test_fingerprint_depends_on_secret_key(settings):
    settings.SECRET_KEY = "one-" + "a" * 50
    first = crypto.fingerprint(SECRET)
    settings.SECRET_KEY = "two-" + "b" * 50
    assert crypto.fingerprint(SECRET) != first
    settings.SECRET_KEY = "one-" + "a" * 50
    assert crypto.fingerprint(SECRET) == first


def test_fingerprint_distinguishes_and_matches():
    assert crypto.fingerprint(b"secret-one") != crypto.fingerprint(b"secret-two")
    assert crypto.fingerprint({"a": "1"}) != crypto.fingerprint({"a": "2"})
    assert crypto.fingerprint({"a": 1, "b": {"y": 2, "x": 1}}) == crypto.fingerprint({"b": {"x": 1, "y": 2}, "a": 1})
    assert crypto.fingerprint("pässword") == crypto.fingerprint("pässword".encode())
    assert crypto.fingerprint(bytearray(b"abc")) == crypto.fingerprint(b"abc")
    # The dict form fingerprints its canonical JSON.
    assert crypto.fingerprint({"b": 1, "a": 2}) == crypto.fingerprint('{"a":2,"b":1}')


@pytest.mark.parametrize("value", [None, 123, ["list"], 1.5])
def test_fingerprint_rejects_other_types(value):
    with pytest.raises(TypeError):
        crypto.fingerprint(value)


def test_fingerprint_matches_between_encrypted_copies(ring):
    """Two rows holding the same secret have different tokens but the same fingerprint."""
    data = {"api_key": SECRET.decode()}
    one = crypto.encrypt_json(data, context="server-1")
    two = crypto.encrypt_json(data, context="server-2")
    assert one != two
    assert crypto.fingerprint(crypto.decrypt_json(one, context="server-1")) == crypto.fingerprint(
        crypto.decrypt_json(two, context="server-2")
    )
