"""Bad input anywhere under /api/ gets a JSON 4xx that names the problem: deep JSON, integers
past any column, bodies over the upload limit, unknown URLs, malformed ids, NULs and invalid
UTF-8. Never a 500, never an HTML page (the web UI keeps its HTML)."""

from __future__ import annotations

import json
import socket

import pytest
from django.test import Client
from rest_framework.test import APIClient

from external_mcp import services
from external_mcp.models import ExternalMcpServer
from tests.gateway import close_gateway_connections, start_gateway
from twinmcp.parsers import MAX_JSON_DEPTH

SERVERS = "/api/v1/external-mcp/servers/"
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 30


@pytest.fixture
def server(admin, flag_on):
    return services.server_create(workspace=admin.workspace, actor=admin.user, name="s1",
                                  base_url="https://93.184.215.14/mcp", auth_type="bearer",
                                  credentials={"token": "t-123"})


def json_endpoints(server) -> list[tuple[str, str]]:
    return [
        ("post", SERVERS),
        ("patch", f"{SERVERS}{server.pk}/"),
        ("put", f"{SERVERS}{server.pk}/credentials/"),
        ("post", f"{SERVERS}{server.pk}/tools/approve/"),
        ("post", "/api/v1/api-keys/"),
    ]


def nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def send(client: APIClient, method: str, url: str, raw: str | bytes, content_type: str = "application/json"):
    return client.generic(method.upper(), url, raw, content_type=content_type)


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    return response.json()


# -- deep JSON --------------------------------------------------------------------------------------


def test_json_nested_100000_levels_is_a_400_naming_the_depth_on_every_json_endpoint(admin, server):
    client = admin.client()
    for method, url in json_endpoints(server):
        body = assert_json_error(send(client, method, url, DEEP), 400)
        assert "nested" in body["detail"] and str(MAX_JSON_DEPTH) in body["detail"], (url, body)
    server.refresh_from_db()
    assert server.name == "s1"


def test_json_one_level_past_the_limit_is_refused_and_at_the_limit_is_parsed(admin, server):
    client = admin.client()
    url = f"{SERVERS}{server.pk}/credentials/"
    too_deep = {"credentials": nested(MAX_JSON_DEPTH)}  # the outer object adds one level
    body = assert_json_error(send(client, "put", url, json.dumps(too_deep)), 400)
    assert "nested" in body["detail"]
    at_limit = {"credentials": nested(MAX_JSON_DEPTH - 1)}
    body = assert_json_error(send(client, "put", url, json.dumps(at_limit)), 400)
    assert "credentials" in body  # parsed, then refused by the credential rules


def test_deep_json_in_a_form_field_is_a_400_naming_the_field(admin, server):
    response = admin.client().post(SERVERS, {"name": "f", "base_url": "https://93.184.215.14/x",
                                             "auth_type": "bearer", "credentials": DEEP})
    body = assert_json_error(response, 400)
    assert "credentials" in body and "nested" in body["credentials"][0]
    assert not ExternalMcpServer.objects.filter(name="f").exists()


def test_json_with_invalid_utf8_or_nul_is_a_400_naming_the_field(admin, server):
    client = admin.client()
    body = assert_json_error(send(client, "post", SERVERS, b'{"name": "\xff\xfe"}'), 400)
    assert "JSON" in body["detail"] or "UTF-8" in body["detail"]
    body = assert_json_error(send(client, "post", SERVERS, json.dumps(
        {"name": "a\u0000b", "base_url": "https://93.184.215.14/x"})), 400)
    assert "name" in body
    body = assert_json_error(send(client, "patch", f"{SERVERS}{server.pk}/", json.dumps(
        {"description": "x\u0000y", "tags": ["t\u0000"]})), 400)
    assert {"description", "tags"} <= set(body)


# -- integers in query parameters ----------------------------------------------------------------


@pytest.mark.parametrize("value", [HUGE, "-1", "abc", "1.5", "2147483648"])
@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("url", [SERVERS, "/api/v1/external-mcp/usage"])
def test_pagination_parameters_out_of_range_are_400_naming_the_parameter(admin, server, url, name, value):
    body = assert_json_error(admin.client().get(url, {name: value}), 400)
    assert list(body) == [name], body


@pytest.mark.parametrize(("name", "value"), [("limit", "0"), ("limit", "1001")])
def test_limit_bounds_are_one_to_a_thousand(admin, server, name, value):
    body = assert_json_error(admin.client().get(SERVERS, {name: value}), 400)
    assert "1000" in body[name][0]


def test_pagination_within_range_still_works(admin, server):
    body = admin.client().get(SERVERS, {"limit": "1000", "offset": "2147483647"}).json()
    assert body["count"] == 1 and body["results"] == []
    assert admin.client().get(SERVERS, {"limit": "", "offset": ""}).json()["count"] == 1


@pytest.mark.parametrize("params", [
    {"user": HUGE}, {"user": "-" + HUGE}, {"user": "\u00b2"}, {"user": "\u0663"},
    {"server": HUGE}, {"start": "99999-01-01"}, {"end": "0000-01-01"},
    {"start": "0001-01-01", "end": "0001-01-05"},
])
def test_usage_filters_with_huge_or_edge_values_are_400_or_empty_never_500(admin, server, params):
    client = admin.client()
    for url in ("/api/v1/external-mcp/usage", "/api/v1/external-mcp/usage/export"):
        response = client.get(url, params)
        assert response.status_code in (200, 400), (url, params, response.status_code)
        if response.status_code == 400:
            assert set(response.json()) <= {"user", "server", "start", "end"}


def test_usage_dashboard_with_edge_dates_is_not_a_500(admin_web):
    for params in ({"end": "0001-01-01"}, {"start": "0001-01-01", "end": "0001-01-02"}, {"end": "9999-12-31"},
                   {"user": HUGE}, {"server": HUGE}):
        response = admin_web.get("/usage/", params)
        assert response.status_code == 200, (params, response.status_code)


# -- oversized bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_bodies_over_the_upload_limit_are_json_413_naming_the_limit(admin, server, settings, content_type):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    client = admin.client()
    if content_type == "application/json":
        raw = json.dumps({"name": "big", "base_url": "https://93.184.215.14/x", "description": "d" * 2000})
    else:
        raw = "name=big&base_url=https://93.184.215.14/x&description=" + "d" * 2000
    for method, url in json_endpoints(server):
        body = assert_json_error(send(client, method, url, raw, content_type), 413)
        assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in body["detail"] and "1000" in body["detail"]
    assert not ExternalMcpServer.objects.filter(name="big").exists()


def test_multipart_body_over_the_upload_limit_is_json_413(admin, server, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = admin.client().post(SERVERS, {"name": "big", "base_url": "https://93.184.215.14/x",
                                             "description": "d" * 2000}, format="multipart")
    body = assert_json_error(response, 413)
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in body["detail"]


def test_session_client_over_the_upload_limit_gets_json_413(client, admin, flag_on, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    client.force_login(admin.user)
    response = client.post(SERVERS, {"name": "big", "description": "d" * 2000})
    assert_json_error(response, 413)


def test_too_many_form_fields_is_a_json_400(admin, server, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    raw = "&".join(f"f{i}=1" for i in range(50))
    body = assert_json_error(send(admin.client(), "post", SERVERS, raw, "application/x-www-form-urlencoded"), 400)
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in body["detail"]


def test_a_body_at_the_default_limit_is_refused_whole(admin, server, settings):
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    raw = json.dumps({"name": "big", "description": "d" * limit})
    assert_json_error(send(admin.client(), "post", SERVERS, raw), 413)


def test_web_form_over_the_upload_limit_stays_an_html_page(admin_web, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = admin_web.post("/servers/new/", {"name": "big", "description": "d" * 2000})
    assert response.status_code in (400, 413)
    assert not response["Content-Type"].startswith("application/json")


# -- unknown URLs and other errors ----------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/v1/nope",
    "/api/v1/external-mcp/servers/not-a-uuid/",
    "/api/v1/external-mcp/servers/0000/",
    "/api/v1/external-mcp/servers/00000000-0000-0000-0000-000000000000/",
    "/api/v1/external-mcp/not-a-uuid/mcp",
    "/api/v1/api-keys/12/",
    "/api/v1/external-mcp/servers/%ff/",
    "/api/",
])
def test_unknown_api_urls_and_malformed_ids_are_json_404(admin, server, path):
    body = assert_json_error(admin.client().get(path), 404)
    assert body["detail"]


def test_unknown_web_urls_stay_html(admin_web):
    response = admin_web.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_unexpected_error_under_api_is_a_json_500_without_details(admin, server, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("internal detail 42")

    monkeypatch.setattr(services, "server_delete", boom)
    client = admin.client()
    client.raise_request_exception = False
    response = client.delete(f"{SERVERS}{server.pk}/")
    body = assert_json_error(response, 500)
    assert "internal detail" not in response.content.decode()
    assert body["detail"]


def test_handlers_answer_json_only_under_api(rf):
    from twinmcp import api_errors

    assert api_errors.handler404(rf.get("/api/v1/x"), Exception())["Content-Type"] == "application/json"
    assert api_errors.handler404(rf.get("/servers/x"), Exception())["Content-Type"].startswith("text/html")
    assert api_errors.handler500(rf.get("/api/v1/x")).status_code == 500
    assert api_errors.handler500(rf.get("/servers/"))["Content-Type"].startswith("text/html")
    assert api_errors.handler403(rf.get("/api/v1/x"), Exception()).status_code == 403
    assert api_errors.handler400(rf.get("/api/v1/x"), Exception()).status_code == 400


# -- NULs and invalid UTF-8 in headers and parameters --------------------------------------------


@pytest.mark.parametrize("query", [
    "search=a%00b", "tag=%00", "status=%00", "search=%ff%fe", "tag=%c3%28", "limit=%00", "offset=1%00",
])
def test_nul_and_invalid_utf8_in_server_list_parameters_never_500(admin, server, query):
    response = admin.client().get(f"{SERVERS}?{query}")
    assert response.status_code in (200, 400), (query, response.status_code)
    assert response["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("query", [
    "user=%00", "tool=%00", "workspace=a%00", "group_by=day%00", "format=%ff", "start=%00", "server=%00",
    "pseudonymize=%00", "level=%c3%28", "user=%ff",
])
def test_nul_and_invalid_utf8_in_usage_parameters_never_500(admin, server, query):
    for url in ("/api/v1/external-mcp/usage", "/api/v1/external-mcp/usage/export"):
        response = admin.client().get(f"{url}?{query}")
        assert response.status_code in (200, 400), (url, query, response.status_code)


@pytest.mark.parametrize("headers", [
    {"HTTP_X_REQUEST_ID": "a\x00b"},
    {"HTTP_X_REQUEST_ID": "\xff\xfe"},
    {"HTTP_AUTHORIZATION": "Bearer tmcp_\x00"},
    {"HTTP_AUTHORIZATION": "Bearer \xff\xfe\xfd"},
    {"HTTP_AUTHORIZATION": "\x00"},
    {"HTTP_ACCEPT": "application/json\x00"},
    {"HTTP_ACCEPT_LANGUAGE": "\xff"},
    {"HTTP_COOKIE": "sessionid=\x00; csrftoken=\xff"},
    {"CONTENT_TYPE": "application/json; charset=nope"},
])
def test_nul_and_invalid_utf8_in_headers_never_500(admin, server, headers):
    client = APIClient(raise_request_exception=False)
    for method, url in (("get", SERVERS), ("post", SERVERS), ("get", "/api/v1/external-mcp/usage")):
        response = client.generic(method.upper(), url, '{"name": "x"}', **{"CONTENT_TYPE": "application/json",
                                                                        **headers})
        assert response.status_code < 500, (headers, url, response.status_code)
    web = Client(raise_request_exception=False)
    assert web.get("/servers/", **headers).status_code < 500


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no HTTP client library would send; read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.django_db(transaction=True)
def test_the_live_server_answers_hostile_bytes_with_4xx_and_json_under_api(admin, flag_on, settings,
                                                                          django_db_blocker):
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    auth = b"Authorization: Bearer " + admin.raw_key.encode() + b"\r\n"

    def request(line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        return line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + b"".join(headers) + length + \
            b"\r\n" + body

    json_type = b"Content-Type: application/json\r\n"
    cases = {
        "NUL in a header": request(b"GET " + SERVERS.encode(), auth, b"X-Request-Id: a\x00b\r\n"),
        "invalid UTF-8 in a header": request(b"GET " + SERVERS.encode(), auth, b"X-Note: \xff\xfe\r\n"),
        "invalid UTF-8 in the key": request(b"GET " + SERVERS.encode(), b"Authorization: Bearer \xff\xfe\r\n"),
        "NUL in the charset": request(b"POST " + SERVERS.encode(), auth,
                                      b"Content-Type: application/json; charset=a\x00\r\n", body=b"{}"),
        "unknown charset": request(b"POST " + SERVERS.encode(), auth,
                                   b"Content-Type: application/json; charset=\xff\r\n", body=b"{}"),
        "raw invalid UTF-8 in the query": request(b"GET " + SERVERS.encode() + b"?search=\xff", auth),
        "encoded NUL in the query": request(b"GET " + SERVERS.encode() + b"?search=%00&limit=%00", auth),
        "encoded invalid UTF-8 in the path": request(b"GET /api/v1/external-mcp/servers/%ff/", auth),
        "encoded NUL in the path": request(b"GET /api/v1/%00/", auth),
        "huge limit": request(b"GET " + SERVERS.encode() + b"?limit=" + HUGE.encode(), auth),
        "deep JSON": request(b"POST " + SERVERS.encode(), auth, json_type, body=DEEP.encode()),
        "body over the limit": request(b"POST " + SERVERS.encode(), auth, json_type,
                                       body=b" " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)),
        "not a UUID in the proxy path": request(b"POST /api/v1/external-mcp/not-a-uuid/mcp", auth, json_type,
                                                body=b"{}"),
    }
    gateway = start_gateway()
    try:
        for name, raw in cases.items():
            status, headers, body = raw_exchange(gateway.port, raw)
            assert status < 500, (name, status, body[:200])
            assert status in (200, 401) if name in ("invalid UTF-8 in a header", "invalid UTF-8 in the key") \
                else 400 <= status < 500, (name, status, body[:200])
            if body != b"Invalid HTTP request received.":  # refused by uvicorn's parser, before Django
                assert headers["content-type"].startswith("application/json"), (name, headers, body[:200])
                assert json.loads(body)
    finally:
        gateway.stop()
        with django_db_blocker.unblock():
            close_gateway_connections()


def test_nul_invalid_utf8_and_huge_numbers_in_web_page_parameters_never_500(admin_web, server):
    hostile = "%00a%ff%c3%28" + HUGE
    for path in ("/servers/", "/usage/", "/notifications/", "/servers/new/", f"/servers/{server.pk}/edit/",
                 f"/servers/{server.pk}/", "/api-keys/"):
        for name in ("search", "tag", "status", "user", "server", "tool", "start", "end", "group_by", "page",
                     "unread", "auth_type", "next"):
            response = admin_web.get(f"{path}?{name}={hostile}")
            assert response.status_code < 500, (path, name, response.status_code)
