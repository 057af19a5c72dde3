"""How TwinMCP authenticates to an upstream: one small class per ``auth_type``.

A scheme whose token is obtained over the network (OAuth) gives it per request
(``request_headers``); the others' headers are computed once per credential. SSL contexts are costly to
build (ContextForge rebuilt them per call), so they are cached per credential fingerprint.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import ClassVar

import aiohttp

from external_mcp.choices import AuthType
from external_mcp.oauth import grants, tokens


class AuthScheme:
    auth_type: ClassVar[str]

    def __init__(self, payload: dict[str, str] | None, *, cache_key: str = "") -> None:
        self.payload = payload or {}
        self.cache_key = cache_key

    fetches_token: ClassVar[bool] = False
    """Its header carries a token obtained over the network (``request_headers``), not a stored one."""

    def headers(self) -> dict[str, str]:
        return {}

    async def request_headers(self, session: aiohttp.ClientSession, base_url: str, *,
                              refused: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers of one request; ``refused``: those the upstream just refused (401), so a
        token that another request has already replaced is not replaced again."""
        return self.headers()

    async def check_headers(self, session: aiohttp.ClientSession, base_url: str) -> dict[str, str]:
        """The headers of a health check."""
        return await self.request_headers(session, base_url)

    def ssl_context(self) -> ssl.SSLContext:
        return default_ssl_context()


class NoAuth(AuthScheme):
    auth_type = AuthType.NONE


class ApiKeyAuth(AuthScheme):
    auth_type = AuthType.API_KEY

    def headers(self) -> dict[str, str]:
        return {self.payload.get("header", "X-API-Key"): self.payload["value"]}


class BasicAuth(AuthScheme):
    auth_type = AuthType.BASIC

    def headers(self) -> dict[str, str]:
        raw = f"{self.payload['username']}:{self.payload['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


class BearerAuth(AuthScheme):
    auth_type = AuthType.BEARER

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.payload['token']}"}


class OAuthClientCredentialsAuth(AuthScheme):
    auth_type = AuthType.OAUTH2_CLIENT_CREDENTIALS
    fetches_token = True

    async def request_headers(self, session: aiohttp.ClientSession, base_url: str, *,
                              refused: Mapping[str, str] | None = None) -> dict[str, str]:
        token = await tokens.access_token(self.payload, base_url=base_url, cache_key=self.cache_key,
                                          session=session, refused=_bearer(refused))
        return {"Authorization": f"Bearer {token}"}

    async def check_headers(self, session: aiohttp.ClientSession, base_url: str) -> dict[str, str]:
        """A new token at every check: the check proves the credentials work now, not that a token
        obtained earlier has not expired yet (the gateway then uses the same one)."""
        token = await tokens.access_token(self.payload, base_url=base_url, cache_key=self.cache_key,
                                          session=session, fresh=True)
        return {"Authorization": f"Bearer {token}"}


class OAuthGrantAuth(AuthScheme):
    """An account connected with the authorization-code flow: the connection's access token,
    refreshed when it ends or is refused (``external_mcp.oauth.grants``)."""

    auth_type = AuthType.OAUTH2
    fetches_token = True

    def __init__(self, grant: grants.Grant) -> None:
        super().__init__(None, cache_key=str(grant.connection_id))
        self.grant = grant

    async def request_headers(self, session: aiohttp.ClientSession, base_url: str, *,
                              refused: Mapping[str, str] | None = None) -> dict[str, str]:
        token = await grants.access_token(self.grant, refused=_bearer(refused))
        return {"Authorization": f"Bearer {token}"}


def _bearer(headers: Mapping[str, str] | None) -> str | None:
    value = (headers or {}).get("Authorization", "")
    return value.removeprefix("Bearer ") if value else None


class MtlsAuth(AuthScheme):
    auth_type = AuthType.MTLS

    def ssl_context(self) -> ssl.SSLContext:
        return _contexts.get(self.cache_key, self._build)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if ca := self.payload.get("ca_bundle_pem"):
            context.load_verify_locations(cadata=ca)
        # ssl can only load a certificate chain from files: write them to a private
        # directory, load, and remove them at once.
        with tempfile.TemporaryDirectory(prefix="twinmcp-mtls-") as folder:
            os.chmod(folder, 0o700)
            cert_path = os.path.join(folder, "cert.pem")
            key_path = os.path.join(folder, "key.pem")
            files = ((cert_path, self.payload["client_cert_pem"]), (key_path, self.payload["client_key_pem"]))
            for path, text in files:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
            context.load_cert_chain(cert_path, key_path)
        return context


SCHEMES: dict[str, type[AuthScheme]] = {
    scheme.auth_type: scheme
    for scheme in (NoAuth, ApiKeyAuth, BasicAuth, BearerAuth, MtlsAuth, OAuthClientCredentialsAuth)
}


def build_scheme(auth_type: str, payload: dict[str, str] | None, *, cache_key: str = "") -> AuthScheme:
    try:
        scheme = SCHEMES[auth_type]
    except KeyError:
        raise ValueError(f"auth_type {auth_type!r} is not supported yet") from None
    return scheme(payload, cache_key=cache_key)


class _ContextCache:
    """A small LRU of SSL contexts keyed by server id + credential fingerprint."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.items: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str, build: object) -> ssl.SSLContext:
        with self.lock:
            if key and key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        context = build()  # type: ignore[operator]
        if key:
            with self.lock:
                self.items[key] = context
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
        return context


_contexts = _ContextCache()
_default_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    global _default_context
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context
