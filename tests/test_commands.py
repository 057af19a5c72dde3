from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from twinmcp.management.commands import seed_demo
from twinmcp.models import Membership, Workspace
from usage.models import UsageEvent


def run(*args: str, stdin: str | None = None, monkeypatch=None) -> str:
    out = io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    call_command(*args, stdout=out)
    return out.getvalue()


def test_the_readme_sequence_prints_a_working_key(db, monkeypatch):
    assert "acme" in run("createworkspace", "acme")
    run("addmember", "acme", "alice", "--role", "admin", "--create", "--password-stdin",
        stdin="correct horse battery\n", monkeypatch=monkeypatch)
    key = run("create_api_key", "alice", "acme").strip()
    assert key.startswith("tmcp_") and "\n" not in key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    listing = client.get("/api/v1/api-keys/")
    assert listing.status_code == 200
    key_id = listing.json()[0]["id"]
    assert client.delete(f"/api/v1/api-keys/{key_id}/").status_code == 204
    assert client.get("/api/v1/api-keys/").status_code == 401
    assert client.login(username="alice", password="correct horse battery")


def test_createworkspace_with_name_and_duplicate(db):
    run("createworkspace", "acme", "--name", "Acme Corp")
    assert Workspace.objects.get(slug="acme").name == "Acme Corp"
    with pytest.raises(CommandError, match="already exists"):
        run("createworkspace", "acme")


def test_createworkspace_rejects_bad_slug(db):
    with pytest.raises(CommandError, match="not a valid slug"):
        run("createworkspace", "Not A Slug")


def test_addmember_unknown_workspace(db):
    with pytest.raises(CommandError, match="does not exist"):
        run("addmember", "nope", "alice", "--role", "admin", "--create")


def test_addmember_unknown_user_without_create(workspace):
    with pytest.raises(CommandError, match="--create"):
        run("addmember", "acme", "ghost", "--role", "member")


def test_addmember_bad_role_is_one_line_error(workspace):
    with pytest.raises(CommandError, match="invalid choice"):
        run("addmember", "acme", "ghost", "--role", "owner")


def test_addmember_empty_password_stdin(workspace, monkeypatch):
    with pytest.raises(CommandError, match="no password"):
        run("addmember", "acme", "x", "--role", "member", "--create", "--password-stdin",
            stdin="", monkeypatch=monkeypatch)


def test_addmember_weak_password_is_refused_and_nothing_is_created(workspace, monkeypatch, django_user_model):
    with pytest.raises(CommandError, match="too short"):
        run("addmember", "acme", "x", "--role", "member", "--create", "--password-stdin",
            stdin="abc\n", monkeypatch=monkeypatch)
    assert not django_user_model.objects.filter(username="x").exists()


def test_addmember_changes_role_and_plan(member):
    run("addmember", "acme", "bob", "--role", "admin", "--plan", "pro")
    membership = Membership.objects.get(user=member.user)
    assert membership.role == "admin"
    member.user.profile.refresh_from_db()
    assert member.user.profile.plan.code == "pro"
    assert member.user.profile.plan.effective_daily_limit is None


def test_create_api_key_errors(member, outsider):
    with pytest.raises(CommandError, match="User 'nobody'"):
        run("create_api_key", "nobody", "acme")
    with pytest.raises(CommandError, match="Workspace 'nope'"):
        run("create_api_key", "bob", "nope")
    with pytest.raises(CommandError, match="not a member"):
        run("create_api_key", "bob", "globex")


def test_commands_exit_non_zero_with_one_line(db, capsys):
    from django.core.management import ManagementUtility

    utility = ManagementUtility(["manage.py", "create_api_key", "nobody", "acme"])
    with pytest.raises(SystemExit) as exc:
        utility.execute()
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "CommandError: User 'nobody' does not exist."


def test_seed_demo_is_idempotent(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    first = run("seed_demo")
    second = run("seed_demo")
    assert first == second
    key = next(line.split()[-1] for line in first.splitlines() if "API key" in line)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/api-keys/").status_code == 200
    password = next(line.split()[-1] for line in first.splitlines() if "password" in line)
    assert client.login(username="admin", password=password)
    assert Workspace.objects.filter(slug="demo").count() == 1
    # A week of past usage, once, never today (the quota starts empty).
    days = sorted({e.created_at.date() for e in UsageEvent.objects.all()})
    today = timezone.now().date()
    assert days == [today - timedelta(days=n) for n in range(7, 0, -1)]
    assert UsageEvent.objects.count() == len(seed_demo.demo_usage(
        workspace=Workspace.objects.get(slug="demo"), user=None, server=None, api_key=None, today=today))
