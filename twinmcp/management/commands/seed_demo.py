"""Idempotent demo data for ``make run``: a workspace, an admin, an API key, the flag on, the
demo servers, and a week of past usage (so the usage pages, billing and export pipelines have
finished days to show from the first start).

Raw secrets cannot be read back from the database (only hashes are stored), so the demo
password and key are kept in ``var/demo.json`` to be printed again on the next run.
"""

from __future__ import annotations

import json
import random
import secrets
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from external_mcp.models import ExternalMcpServer
from external_mcp.services import server_create
from twinmcp import services
from twinmcp.apikeys import hash_key
from twinmcp.flags import flag_enable_for_workspace
from twinmcp.models import ApiKey, Role, Workspace
from usage.models import Outcome, UsageEvent

DEMO_SLUG = "demo"
DEMO_SERVER = "Demo MCP server"
DEMO_UPSTREAM_URL = "http://127.0.0.1:8765/mcp"
DEMO_SSE_SERVER = "Legacy demo server (HTTP+SSE)"
DEMO_SSE_URL = "http://127.0.0.1:8765/sse"
DEMO_USER = "admin"
DEMO_USAGE_DAYS = 7
DEMO_TOOLS = ("echo", "add", "count")


class Command(BaseCommand):
    help = "Create (or reuse) the demo workspace, admin user and API key, and print them."

    def handle(self, *args: Any, **options: Any) -> None:
        state_file = Path(settings.VAR_DIR) / "demo.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        with transaction.atomic():
            workspace = Workspace.objects.filter(slug=DEMO_SLUG).first() or services.workspace_create(
                slug=DEMO_SLUG, name="Demo workspace"
            )
            user_model = get_user_model()
            user = user_model.objects.filter(username=DEMO_USER).first()
            if user is None or not state.get("password") or not user.check_password(state["password"]):
                state["password"] = secrets.token_urlsafe(12)
                user = user or user_model(username=DEMO_USER, email="admin@example.com")
                user.set_password(state["password"])
                user.is_staff = user.is_superuser = True
                user.save()
            services.member_add(workspace=workspace, user=user, role=Role.ADMIN)
            raw = state.get("api_key")
            if not raw or not ApiKey.objects.active().filter(key_hash=hash_key(raw), user=user).exists():
                _, raw = services.api_key_create(user=user, workspace=workspace, name="demo")
                state["api_key"] = raw
            flag_enable_for_workspace(workspace=workspace)
            server = self._demo_server(workspace, user, DEMO_SERVER, DEMO_UPSTREAM_URL)
            legacy = self._demo_server(workspace, user, DEMO_SSE_SERVER, DEMO_SSE_URL, prefix="legacy-demo")
            if server is not None and not UsageEvent.objects.filter(workspace=workspace).exists():
                key = ApiKey.objects.active().filter(user=user, workspace=workspace).order_by("created_at").first()
                UsageEvent.objects.bulk_create(demo_usage(workspace=workspace, user=user, server=server, api_key=key,
                                                          today=timezone.now().date()))
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))
        state_file.chmod(0o600)
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "TwinMCP is starting at  http://127.0.0.1:8000/",
                    f"  login:     {DEMO_USER}",
                    f"  password:  {state['password']}",
                    f"  API key:   {state['api_key']}",
                    f"  workspace: {workspace.slug}",
                    f"  demo MCP server: {server.id if server else '(not registered)'} -> {DEMO_UPSTREAM_URL}",
                    f"  legacy demo server (HTTP+SSE): {legacy.id if legacy else '(not registered)'} -> {DEMO_SSE_URL}",
                    "  workspace endpoint: http://127.0.0.1:8000/api/v1/external-mcp/mcp"
                    + (f"  (tools: {server.prefix}__echo, …)" if server else ""),
                    f"  server endpoint: http://127.0.0.1:8000/api/v1/external-mcp/{server.id}/mcp" if server else "",
                    "",
                ]
            )
        )

    def _demo_server(self, workspace: Workspace, user: object, name: str, url: str,
                     prefix: str | None = None) -> ExternalMcpServer | None:
        server = ExternalMcpServer.objects.filter(workspace=workspace, name=name).first()
        if server is not None:
            return server
        try:
            return server_create(
                workspace=workspace, actor=user, name=name, base_url=url, prefix=prefix,
                description="Started by make run: echo, add and count (with progress).", tags=["demo"],
            )
        except ValidationError as exc:
            self.stderr.write(
                f"Demo server not registered ({'; '.join(exc.messages)}). make run sets "
                "EXTERNAL_MCP_ALLOWED_PROTOCOLS=https,http and EXTERNAL_MCP_ALLOWED_NETWORKS=127.0.0.1/32."
            )
            return None


def demo_usage(*, workspace: Workspace, user: Any, server: ExternalMcpServer, api_key: ApiKey | None,
               today: Any) -> list[UsageEvent]:
    """Tool calls on each of the last ``DEMO_USAGE_DAYS`` days (never today: the quota starts
    empty), the same every time for the same day."""
    events = []
    for back in range(DEMO_USAGE_DAYS, 0, -1):
        day = today - timedelta(days=back)
        rng = random.Random(day.toordinal())
        midnight = datetime.combine(day, time(), tzinfo=UTC)
        for _ in range(rng.randint(20, 60)):
            outcome = rng.choices([Outcome.OK, Outcome.ERROR, Outcome.TIMEOUT], weights=[90, 7, 3])[0]
            events.append(UsageEvent(
                created_at=midnight + timedelta(seconds=rng.uniform(8 * 3600, 20 * 3600)), user=user,
                workspace=workspace, server=server, api_key=api_key, method="tools/call",
                tool_name=rng.choice(DEMO_TOOLS), jsonrpc_id=str(rng.randint(1, 999)), request_id=uuid.uuid4().hex,
                tokens_in=rng.randint(5, 80), tokens_out=rng.randint(5, 400), bytes_in=rng.randint(80, 600),
                bytes_out=rng.randint(80, 3000), latency_ms=round(rng.uniform(2, 250), 3), outcome=outcome,
                upstream_status=200, counted=outcome == Outcome.OK))
    return events
