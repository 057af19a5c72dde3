"""Browser tests: Playwright (PyPI ``playwright``) driving Debian's Chromium against pytest-django's
``live_server``. Run ``bash .ci/browser.sh`` once to install Chromium; without Playwright or Chromium
these tests are skipped locally and fail in CI (``CI=true``)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TWINMCP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (run `bash .ci/browser.sh`)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def _sync_orm_beside_playwright() -> Iterator[None]:
    """Playwright's running loop makes Django take the tests' ORM calls (and the database flush after
    each test) for calls from async code; they are plain sync calls. Only for this module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="module")
def browser(_sync_orm_beside_playwright) -> Iterator[object]:
    """One headless Chromium per module. Not per session: Playwright's sync API keeps its asyncio loop
    marked as running on the main thread until it stops, which would break later tests' asyncio.run()."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        _unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(autouse=True)
def _browser_settings(settings) -> None:
    """What a browser on http://localhost needs from the production-like test settings."""
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost", "127.0.0.1"]
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    # The live server serves static files from the finders, under their plain names.
    settings.STORAGES = {**settings.STORAGES,
                         "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["http", "https"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    # A check of a live loopback peer must pass however loaded the machine is (slowness has its own tests).
    settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS = 30_000
    settings.EXTERNAL_MCP_HEALTH_SLOW_MS = 30_000
    settings.TWINMCP_UI_POLL_SECONDS = 1


class PageProblems:
    """CSP violations and JavaScript errors seen by a page: each test ends asserting there were none."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def watch(self, page) -> None:
        page.on("console", lambda msg: self.items.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" and "Failed to load resource" not in msg.text else None)
        page.on("pageerror", lambda exc: self.items.append(f"page error: {exc}"))


@pytest.fixture
def page(browser, live_server) -> Iterator[object]:
    context = browser.new_context(viewport=DESKTOP, base_url=live_server.url, accept_downloads=True)
    context.set_default_timeout(30_000)  # every wait is for a condition; the deadline is for a broken page
    page = context.new_page()
    problems = PageProblems()
    problems.watch(page)
    page.problems = problems
    yield page
    context.close()
    assert problems.items == [], problems.items


def screenshot(page, name: str) -> None:
    """Save the page at 1280 px and at 390 px (phone) under tests/screenshots/.

    Each file is replaced whole (written aside, then renamed): two runs from one checkout never
    leave a half-written picture."""
    SCREENSHOTS.mkdir(exist_ok=True)
    original = page.viewport_size
    for label, size in (("1280", DESKTOP), ("390", PHONE)):
        page.set_viewport_size(size)
        target = SCREENSHOTS / f"{name}-{label}.png"
        with tempfile.NamedTemporaryFile(dir=SCREENSHOTS, prefix=f".{target.name}.", delete=False) as aside:
            aside.write(page.screenshot(full_page=True))
        os.replace(aside.name, target)
    page.set_viewport_size(original)


PASSWORD = "pw-browser-1"


@pytest.fixture
def people(django_user_model) -> dict[str, object]:
    """A workspace with the feature on, alice its admin and bob a member (password ``PASSWORD``)."""
    from twinmcp import services
    from twinmcp.flags import flag_enable_for_workspace
    from twinmcp.models import Role

    workspace = services.workspace_create(slug="acme", name="Acme")
    flag_enable_for_workspace(workspace=workspace)
    alice = django_user_model.objects.create_user(username="alice", password=PASSWORD)
    bob = django_user_model.objects.create_user(username="bob", password=PASSWORD)
    services.member_add(workspace=workspace, user=alice, role=Role.ADMIN)
    services.member_add(workspace=workspace, user=bob, role=Role.MEMBER)
    return {"workspace": workspace, "alice": alice, "bob": bob}


def login(page, username: str) -> None:
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/$"))


def in_thread(fn, *args):
    """Django work that runs its own event loop (``asyncio.run`` inside a check or a call), off the
    thread Playwright's loop lives on; the thread's database connections end with it."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def run():
        try:
            return fn(*args)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result(timeout=60)


def check(server_id):
    """One health check of the server now, recorded as the scheduled ones are."""
    from external_mcp import health
    from external_mcp.models import ExternalMcpServer

    return health.check_now(ExternalMcpServer.objects.select_related("credential").get(pk=server_id))
