"""Export destinations as operators manage them: validation naming the field, the write-only
password on the key ring, the admin pages and their action, a changed shape delivered again, and
the delivery state in /metrics."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from datetime import UTC, date, datetime
from unittest import mock

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from external_mcp import crypto
from tests.test_key_rotation import new_key, rotate
from tests.test_usage_aggregation import at, ev, make_server, store
from usage import aggregation, delivery, destinations
from usage.models import ExportDelivery, ExportDestination

D1 = date(2026, 11, 18)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def usage(admin):
    with time_machine.travel(NOW, tick=False):
        store(ev(at(D1, 1), admin, make_server(admin)))
        aggregation.run_scheduled(NOW)
        yield


@pytest.fixture
def staff(django_user_model) -> Client:
    user = django_user_model.objects.create_user("root", password="pw-for-tests", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(("fields", "errors"), [
    ({"kind": "files", "directory": "relative/dir"}, {"directory"}),
    ({"kind": "files"}, {"directory"}),
    ({"kind": "clickhouse", "url": "ftp://host"}, {"url"}),
    ({"kind": "clickhouse", "url": "http://"}, {"url"}),
    ({"kind": "clickhouse", "url": "http://host:99999"}, {"url"}),
    ({"kind": "clickhouse", "url": "http://u:p@host:8123"}, {"url"}),
    ({"kind": "clickhouse", "url": "http://host:8123/db?x=1"}, {"url"}),
    ({"kind": "clickhouse", "url": "http://host", "database": "bad-name"}, {"database"}),
    ({"kind": "clickhouse", "url": "http://host", "database": ""}, {"database"}),
    ({"kind": "clickhouse", "url": "http://host", "table": "x; DROP TABLE y"}, {"table"}),
    ({"kind": "files", "directory": "/tmp/x", "level": "hourly"}, {"level"}),
    ({"kind": "nope"}, {"kind"}),
])
def test_bad_settings_name_the_field(db, fields, errors):
    with pytest.raises(ValidationError) as caught:
        destinations.destination_create(name="d", **fields)
    assert set(caught.value.message_dict) >= errors
    assert not ExportDestination.objects.exists()


def test_the_password_is_encrypted_bound_to_its_destination_and_rotated(db, settings):
    settings.TWINMCP_ENCRYPTION_KEYS = [key_a := new_key()]
    destination = destinations.destination_create(name="w", kind="clickhouse", url="http://127.0.0.1:8123",
                                                  username="loader", password="hunter2-secret")
    stored = ExportDestination.objects.get(pk=destination.pk)
    assert "hunter2" not in stored.password_ciphertext and stored.key_id == crypto.current_key_id()
    assert destinations.sink_for(stored).headers["Authorization"].startswith("Basic ")
    other = destinations.destination_create(name="x", kind="clickhouse", url="http://127.0.0.1:8123")
    other.password_ciphertext = stored.password_ciphertext  # copied to another row: refused
    with pytest.raises(crypto.DecryptionError):
        destinations.sink_for(other)

    settings.TWINMCP_ENCRYPTION_KEYS = [new_key(), key_a]
    assert "re-encrypted 1 credential(s); 0 still use an old key" in rotate()
    stored.refresh_from_db()
    assert stored.key_id == crypto.current_key_id()
    assert crypto.decrypt(stored.password_ciphertext, context=stored.context) == b"hunter2-secret"
    destinations.destination_update(destination=stored, password="")
    stored.refresh_from_db()
    assert (stored.password_ciphertext, stored.key_id) == ("", "")
    assert destinations.sink_for(stored).headers["Authorization"] == "Basic " + base64.b64encode(b"loader:").decode()


def test_a_changed_shape_is_delivered_again_and_other_edits_are_not(usage, tmp_path):
    destination = destinations.destination_create(name="lake", kind="files", directory=str(tmp_path / "a"),
                                                  start_day=D1)
    delivery.run_scheduled(NOW)
    assert destination.deliveries.count() == 2
    destinations.destination_update(destination=destination, enabled=True, start_day=D1)
    assert destination.deliveries.count() == 2
    destinations.destination_update(destination=destination, pseudonymize=False)
    assert destination.deliveries.count() == 0
    assert [r.day for r in delivery.run_scheduled(NOW)] == [D1, date(2026, 11, 19)]
    with pytest.raises(ValueError, match="not editable: password_ciphertext"):
        destinations.destination_update(destination=destination, password_ciphertext="x")


def test_admin_adds_a_destination_without_ever_showing_its_password(staff, db):
    response = staff.post("/admin/usage/exportdestination/add/", {
        "name": "warehouse", "kind": "clickhouse", "level": "events", "pseudonymize": "on", "enabled": "on",
        "start_day": "2026-11-18", "directory": "", "url": "http://127.0.0.1:8123", "database": "twinmcp",
        "table": "", "username": "loader", "password": "pa55-word-never-shown"})
    assert response.status_code == 302, response.content.decode()[:3000]
    destination = ExportDestination.objects.get(name="warehouse")
    assert crypto.decrypt(destination.password_ciphertext, context=destination.context) == b"pa55-word-never-shown"
    page = staff.get(f"/admin/usage/exportdestination/{destination.pk}/change/").content.decode()
    assert "pa55-word-never-shown" not in page and destination.password_ciphertext not in page
    assert "stored, encrypted (key " in page and "lag 0 day(s)" in page

    kept = staff.post(f"/admin/usage/exportdestination/{destination.pk}/change/", {
        "name": "warehouse", "kind": "clickhouse", "level": "events", "enabled": "on", "start_day": "2026-11-18",
        "url": "http://127.0.0.1:8123", "database": "twinmcp", "username": "loader", "password": ""})
    assert kept.status_code == 302
    destination.refresh_from_db()
    assert crypto.decrypt(destination.password_ciphertext, context=destination.context) == b"pa55-word-never-shown"
    assert destination.pseudonymize is False


def test_admin_form_names_the_bad_field(staff, db):
    response = staff.post("/admin/usage/exportdestination/add/", {
        "name": "lake", "kind": "files", "level": "daily", "start_day": "2026-11-18", "directory": "not/absolute",
        "database": "twinmcp"})
    assert response.status_code == 200
    assert "Give an absolute directory path for the files." in response.content.decode()
    assert not ExportDestination.objects.exists()


def test_admin_lists_deliveries_and_delivers_days_again(staff, usage, tmp_path, django_assert_max_num_queries):
    destination = destinations.destination_create(name="lake", kind="files", directory=str(tmp_path), start_day=D1)
    delivery.run_scheduled(NOW)
    with django_assert_max_num_queries(12):
        listing = staff.get("/admin/usage/exportdelivery/")
    assert listing.status_code == 200 and "2026" in listing.content.decode()
    assert staff.get("/admin/usage/exportdestination/").status_code == 200
    record = destination.deliveries.get(day=D1)
    response = staff.post("/admin/usage/exportdelivery/", {"action": "deliver_again", "_selected_action": [record.pk]})
    assert response.status_code == 302
    with time_machine.travel(NOW, tick=False):
        assert [r.day for r in delivery.run_scheduled()] == [D1]
    assert ExportDelivery.objects.get(pk=record.pk).attempts == 2


def test_metrics_show_each_enabled_destinations_lag_and_failures(usage, tmp_path, settings):
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    (tmp_path / "blocked").write_text("not a directory")
    destinations.destination_create(name="lake", kind="files", directory=str(tmp_path / "lake"), start_day=D1)
    destinations.destination_create(name="broken", kind="files", directory=str(tmp_path / "blocked"), start_day=D1)
    destinations.destination_create(name="off", kind="files", directory=str(tmp_path), start_day=D1, enabled=False)
    with time_machine.travel(NOW, tick=False):
        delivery.run_scheduled()
        text = Client().get("/metrics").content.decode()
    values = dict(re.findall(r'^(external_mcp_usage_export_\w+\{destination="\w+"\}) (\S+)$', text, re.MULTILINE))
    assert values['external_mcp_usage_export_lag_days{destination="lake"}'] == "0.0"
    assert values['external_mcp_usage_export_lag_days{destination="broken"}'] == "2.0"
    assert values['external_mcp_usage_export_failing_days{destination="broken"}'] == "2.0"
    assert values['external_mcp_usage_export_failures_total{destination="broken"}'] == "2.0"
    assert float(values['external_mcp_usage_export_last_delivery_timestamp_seconds{destination="lake"}']) == \
        NOW.timestamp()
    assert not any('destination="off"' in key for key in values)


def add(*args: str, stdin: str = "") -> str:
    out = io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(stdin)):
        call_command("add_export_destination", *args, stdout=out)
    return out.getvalue()


def test_command_adds_destinations_reading_the_password_from_stdin(db, tmp_path):
    with time_machine.travel(NOW, tick=False):
        assert add("--name", "lake", "--kind", "files", "--directory", str(tmp_path)) == \
            "lake: files, daily, from 2026-11-19\n"
    assert add("--name", "warehouse", "--kind", "clickhouse", "--url", "http://127.0.0.1:8123", "--level", "events",
               "--no-pseudonymize", "--start-day", "2026-11-01", "--username", "loader", "--password-stdin",
               stdin="from stdin\n") == "warehouse: clickhouse, events, from 2026-11-01, with identities\n"
    warehouse = ExportDestination.objects.get(name="warehouse")
    assert crypto.decrypt(warehouse.password_ciphertext, context=warehouse.context) == b"from stdin"


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "lake", "--kind", "files", "--directory", "rel"], "--directory: Give an absolute directory path"),
    (["--name", "Bad Name", "--kind", "files", "--directory", "/tmp"], "--name: "),
    (["--name", "w", "--kind", "clickhouse", "--url", "nope"], "--url: Give ClickHouse's HTTP interface"),
    (["--name", "w", "--kind", "files", "--directory", "/tmp", "--start-day", "30/11"], "--start-day: '30/11'"),
])
def test_command_names_the_bad_option(db, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        add(*args)
    assert not ExportDestination.objects.exists()


def test_web_processes_do_not_load_pyarrow():
    """pyarrow costs ~60 MB per process: only the worker writing files loads it, not every web worker
    (the admin and /metrics import the export modules)."""
    code = ("import sys, django; django.setup(); from django.urls import resolve; resolve('/metrics'); "
            "resolve('/admin/'); from django.contrib import admin; admin.autodiscover(); "
            "import twinmcp.asgi, usage.delivery, usage.export_metrics; print('pyarrow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "twinmcp.settings"})
    assert result.stdout.strip() == "False"
