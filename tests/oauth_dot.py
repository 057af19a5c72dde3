"""An independent, real OAuth 2.1 authorization server for tests: django-oauth-toolkit (DOT) in a
process of its own, and an MCP resource it protects.

The SDK-built server in ``tests/oauth_peers.py`` is written by the same hands as the code it tests;
DOT is not. It runs as a subprocess because it is a Django project with its own settings
(``tests.oauth_as.settings``) and database (a SQLite file in a private temporary directory), which
cannot live in the test process's Django. It serves uvicorn on 127.0.0.1, on a port the test holds
reserved (as ``tests/gateway.py`` does), and is stopped by its own process group only::

    with dot_as() as as_, dot_protected_peer(as_) as peer:
        found = await discover(session, peer.url)        # the peer's 401 names DOT
        ...
        back = as_.consent(url, user="alice")           # the real consent page, over HTTP
        as_.token_requests()                             # Counter by grant_type, as sent

What DOT does (version 3.4.1, configured in ``tests/oauth_as/settings.py``): PKCE S256 only,
refresh-token rotation with reuse protection (a replayed refresh token is ``invalid_grant`` and
revokes its whole family, successors included), RFC 9207 ``iss`` on authorization responses,
RFC 8707 ``resource`` bound to grants and tokens (introspection answers it as ``aud``), RFC 7591
registration (open) whose answer always says ``client_secret_basic`` for a confidential client
whatever was asked, one grant type per client, RFC 7009 revocation and RFC 7662 introspection.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx2
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp

from tests.mcp_peers import LOOPBACK, RunningPeer, _streamable_app, reserve_port

__all__ = ["SCOPE", "DotAuthorizationServer", "DotProtectedPeer", "IntrospectionVerifier", "dot_as",
           "dot_protected_peer"]

SCOPE = "mcp"
USER_COOKIE = "dot_as_user"
"""Names the user ``tests/oauth_as/testing.py``'s auto-login signs in (its ``USER_COOKIE``)."""
REPO = Path(__file__).resolve().parent.parent
# A deadline only a broken server reaches: a busy 2-core machine may take many seconds to import
# Django and migrate; nothing is decided by how long it takes.
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 20.0


_LIVE: set[DotAuthorizationServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A test that forgot its ``with`` must not leave a server behind the session."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


class DotAuthorizationServer:
    """django-oauth-toolkit serving ``tests.oauth_as`` in its own process, on its own database.

    ``access_ttl`` is the access tokens' lifetime in seconds (0: every token is born expired, a
    certain outcome that needs no waiting); ``dcr`` whether RFC 7591 registration is offered.
    """

    def __init__(self, *, access_ttl: int = 3600, dcr: bool = True) -> None:
        self.access_ttl = access_ttl
        self.dcr = dcr
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reservation: socket.socket | None = None
        self._directory: Path | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The origin, e.g. ``http://127.0.0.1:41234``."""
        if not self.port:
            raise RuntimeError("the authorization server has not been started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def issuer(self) -> str:
        """The issuer DOT publishes (RFC 8414) and puts in ``iss`` (RFC 9207): its bare origin."""
        return self.url

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token/"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.url}/introspect/"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DotAuthorizationServer:
        if self.proc is not None:
            return self
        self._directory = Path(tempfile.mkdtemp(prefix="twinmcp-dot-"))
        # Held while the server runs: uvicorn binds beside it (SO_REUSEADDR), nobody else can.
        self._reservation = reserve_port()
        self.port = self._reservation.getsockname()[1]
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.oauth_as.settings",
            "DOT_DB": str(self._directory / "dot.sqlite3"),
            "DOT_ACCESS_TTL": str(self.access_ttl),
            "DOT_DCR": "1" if self.dcr else "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        log = (self._directory / "server.log").open("wb")
        with log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.oauth_as", "--port", str(self.port), "--parent-pid", str(os.getpid())],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output()
                self.stop()  # a server that did not start must not outlive the test
                raise RuntimeError(f"django-oauth-toolkit did not start:\n{output}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        """Whether DOT serves its metadata: migrated, imported and listening."""
        try:
            answer = httpx2.get(f"{self.url}/.well-known/oauth-authorization-server", timeout=5, trust_env=False)
        except httpx2.HTTPError:
            return False
        return answer.status_code == 200

    def output(self) -> str:
        """What the server wrote to stdout/stderr (its warnings and tracebacks), for failure messages."""
        if self._directory is None:
            return ""
        log = self._directory / "server.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        """Ends the process group this object started, and nothing else; removes its files."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=_STOP_TIMEOUT_S)
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> DotAuthorizationServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> DotAuthorizationServer:
        # Off the event loop: starting and stopping block on a process.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- test helpers (the server's /_test/ endpoints and its real pages) --------------------

    def _http(self, **kwargs: Any) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=httpx2.Timeout(30.0), trust_env=False, **kwargs)

    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 document as DOT serves it."""
        with self._http() as http:
            answer = http.get("/.well-known/oauth-authorization-server")
        answer.raise_for_status()
        return answer.json()

    def token_requests(self) -> Counter[str]:
        """The POSTs that reached the token endpoint so far, by ``grant_type``, refused ones included."""
        with self._http() as http:
            answer = http.get("/_test/token-requests")
        answer.raise_for_status()
        return Counter(answer.json())

    def create_client(self, *, redirect_uris: Sequence[str] = (),
                      grant_types: Sequence[str] = ("authorization_code", "refresh_token"),
                      confidential: bool = True, name: str = "test client") -> tuple[str, str | None]:
        """A client made the way an admin makes one in a console: ``(client_id, client_secret)``,
        the secret ``None`` for a public client. DOT keeps one grant type per client (plus refresh
        tokens with ``authorization_code``): a client for both needs two."""
        with self._http() as http:
            answer = http.post("/_test/clients", json={
                "redirect_uris": list(redirect_uris), "grant_types": list(grant_types),
                "confidential": confidential, "name": name})
        if answer.status_code != 201:
            raise RuntimeError(f"client not created: {answer.text}")
        created = answer.json()
        return created["client_id"], created["client_secret"]

    def browser_cookie(self, user: str = "alice") -> dict[str, str]:
        """The cookie that signs a browser in as ``user`` (created if new), for Playwright's
        ``context.add_cookies([as_.browser_cookie("alice")])``; ``?as_user=`` on any URL does the same."""
        return {"name": USER_COOKIE, "value": user, "url": self.url}

    def consent(self, authorization_url: str, user: str = "alice", *, allow: bool = True) -> str:
        """A person at the authorization URL: signed in as ``user`` (created if new), on DOT's real
        consent page, submitting its form (hidden fields and CSRF token as rendered) with
        "Authorize" (or "Cancel" when not ``allow``). Returns the redirect's ``Location``:
        the client's redirect URI with ``code`` (or ``error``), ``state`` and ``iss``."""
        with self._http(cookies={USER_COOKIE: user}, follow_redirects=False) as http:
            page = http.get(authorization_url)
            if page.status_code != 200:
                raise AssertionError(f"no consent page (HTTP {page.status_code}): "
                                     f"{page.headers.get('location') or page.text[:2000]}")
            form = _ConsentForm()
            form.feed(page.text)
            if not form.found:
                raise AssertionError(f"the authorization page has no consent form:\n{page.text[:2000]}")
            fields = dict(form.fields)
            if allow:
                fields["allow"] = "Authorize"
            # The form has no action: the browser posts it back to the page's own URL.
            answer = http.post(authorization_url, data=fields)
        if answer.status_code not in (301, 302, 303) or "location" not in answer.headers:
            raise AssertionError(f"consent did not redirect (HTTP {answer.status_code}):\n{answer.text[:2000]}")
        return answer.headers["location"]


class _ConsentForm(HTMLParser):
    """The named inputs of DOT's ``authorizationForm`` but its submit buttons, as a browser sends them."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False
        self.fields: list[tuple[str, str]] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "form" and attributes.get("id") == "authorizationForm":
            self.found = self._inside = True
        elif tag == "input" and self._inside and attributes.get("name") and attributes.get("type") != "submit":
            self.fields.append((attributes["name"], attributes.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


def dot_as(*, access_ttl: int = 3600, dcr: bool = True) -> DotAuthorizationServer:
    """An unstarted DOT authorization server; it starts on ``with``."""
    return DotAuthorizationServer(access_ttl=access_ttl, dcr=dcr)


# --------------------------------------------------------------------------------------------
# The MCP resource DOT's tokens are for
# --------------------------------------------------------------------------------------------


class IntrospectionVerifier:
    """Checks each bearer token at DOT's introspection endpoint (RFC 7662), authenticated as the
    resource server's own confidential client; no cache, so a revoked token is refused at once.

    The token's resource is the entry of the introspection ``aud`` (DOT's RFC 8707 binding) that
    is this server's URL, so the SDK refuses tokens issued for another resource."""

    def __init__(self, endpoint: str, client_id: str, client_secret: str, resource: str) -> None:
        self.endpoint = endpoint
        self.credentials = (client_id, client_secret)
        self.resource = resource
        self.introspections = 0

    async def verify_token(self, token: str) -> AccessToken | None:
        self.introspections += 1
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0), trust_env=False) as http:
            answer = await http.post(self.endpoint, data={"token": token}, auth=self.credentials)
        if answer.status_code != 200:
            return None
        found = answer.json()
        if not found.get("active"):
            return None
        audiences = found.get("aud") or []
        audiences = [audiences] if isinstance(audiences, str) else list(audiences)
        ours = [a for a in audiences if a.rstrip("/") == self.resource.rstrip("/")]
        return AccessToken(token=token, client_id=found.get("client_id", ""),
                           scopes=str(found.get("scope", "")).split(), expires_at=found.get("exp"),
                           resource=(ours or audiences or [None])[0], subject=found.get("username"))


class DotProtectedPeer(RunningPeer):
    """An SDK ``MCPServer`` on its own loopback origin whose tokens come from DOT: 401 with
    ``WWW-Authenticate: Bearer … resource_metadata=…`` without a valid one, RFC 9728 metadata naming
    the DOT issuer, tools ``whoami`` (the token's user, or its client for a machine token) and
    ``echo``. Its introspection client is created at DOT on first start."""

    def __init__(self, authorization_server: DotAuthorizationServer, *, name: str = "peer-dot") -> None:
        self.authorization_server = authorization_server
        self.verifier: IntrospectionVerifier | None = None
        super().__init__(self._build, name=name)

    def _build(self, peer: RunningPeer) -> ASGIApp:
        as_ = self.authorization_server
        if self.verifier is None:
            client_id, secret = as_.create_client(grant_types=["client_credentials"], name="resource server")
            assert secret is not None
            self.verifier = IntrospectionVerifier(as_.introspection_endpoint, client_id, secret, peer.url)
        server: MCPServer = MCPServer(
            "peer-dot", version="1.0.0", log_level="WARNING", token_verifier=self.verifier,
            auth=AuthSettings(
                issuer_url=as_.issuer,  # type: ignore[arg-type]
                resource_server_url=peer.url,  # type: ignore[arg-type]
                validate_token_resource=True,
                required_scopes=[SCOPE],
            ),
        )

        @server.tool(description="Who the access token was issued to: its user, else its client.")
        def whoami() -> str:
            token = get_access_token()
            assert token is not None  # the bearer middleware let the request in
            return token.subject or token.client_id

        @server.tool(description="Echo the given text back.")
        def echo(text: str) -> str:
            return text

        return _streamable_app(server, json_response=True, stateless=True)

    @property
    def issuer(self) -> str:
        return self.authorization_server.issuer


def dot_protected_peer(authorization_server: DotAuthorizationServer) -> DotProtectedPeer:
    """An unstarted MCP resource protected by ``authorization_server`` (which must be running)."""
    return DotProtectedPeer(authorization_server)
