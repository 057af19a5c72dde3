"""What makes the authorization server drivable by tests, and nothing a real one would have:

- ``TokenRequestCounter`` counts every POST to the token endpoint by ``grant_type`` before DOT
  sees it, so a test can prove how many times a client asked (refused requests included);
- ``AutoLogin`` signs in the user a test names (``?as_user=`` or the ``dot_as_user`` cookie),
  creating it, so the real consent page can be driven by an HTTP client or a browser without a
  password form;
- ``token_requests`` and ``create_client`` are the JSON endpoints the test process calls to read
  the counts and to set up clients an admin would create in a console.

Unprotected on purpose: the server only ever listens on 127.0.0.1 for one test run.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs

from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from oauth2_provider.models import get_application_model

USER_COOKIE = "dot_as_user"
USER_PARAMETER = "as_user"

# RFC 7591 grant type -> DOT's constant; DOT keeps one grant per application and issues refresh
# tokens alongside the authorization code, as its own registration endpoint does.
_GRANTS = {"authorization_code": "authorization-code", "client_credentials": "client-credentials"}

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


class TokenRequestCounter:
    """Counts each POST to the token endpoint by its ``grant_type``, as it arrived on the wire."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.token_path = reverse("oauth2_provider:token")

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST" and request.path == self.token_path:
            # request.body stays readable for DOT: Django caches a form body once read.
            form = parse_qs(request.body.decode("latin-1"))
            with _counts_lock:
                _counts[form.get("grant_type", [""])[0]] += 1
        return self.get_response(request)


class AutoLogin:
    """Signs in the user the request names, creating it: the stand-in for a login form."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        name = request.GET.get(USER_PARAMETER) or request.COOKIES.get(USER_COOKIE)
        if name and (not request.user.is_authenticated or request.user.get_username() != name):
            user, _ = get_user_model().objects.get_or_create(username=name)
            # Only on a change of user: login() rotates the CSRF token, which would invalidate the
            # consent form the previous response rendered.
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return self.get_response(request)


@require_GET
def token_requests(request: HttpRequest) -> JsonResponse:
    """The token-endpoint requests counted so far, by grant type."""
    with _counts_lock:
        return JsonResponse(dict(_counts))


@csrf_exempt
@require_POST
def create_client(request: HttpRequest) -> JsonResponse:
    """A client created the way an admin does in a provider's console. Body (JSON):
    ``redirect_uris`` (list), ``grant_types`` (RFC 7591 names; ``refresh_token`` comes with
    ``authorization_code``), ``confidential`` (bool), ``name``. Answers its id and raw secret."""
    data = json.loads(request.body)
    grants = [g for g in data.get("grant_types", ["authorization_code"]) if g != "refresh_token"]
    if len(grants) != 1 or grants[0] not in _GRANTS:
        return JsonResponse({"error": f"DOT keeps exactly one of {sorted(_GRANTS)} per client, got {grants}"},
                            status=400)
    confidential = bool(data.get("confidential", True))
    application_model = get_application_model()
    application = application_model(
        name=data.get("name", "test client"), redirect_uris=" ".join(data.get("redirect_uris", [])),
        authorization_grant_type=_GRANTS[grants[0]],
        client_type=application_model.CLIENT_CONFIDENTIAL if confidential else application_model.CLIENT_PUBLIC,
    )
    secret = application.client_secret  # raw: save() stores only its hash
    application.full_clean()
    application.save()
    return JsonResponse({"client_id": application.client_id, "client_secret": secret if confidential else None},
                        status=201)
