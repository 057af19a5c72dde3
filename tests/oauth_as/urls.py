"""DOT's endpoints at the server root (so its RFC 8414 metadata sits at the origin's well-known
path and the issuer is the bare origin), plus the test-only JSON endpoints under ``/_test/``."""

from django.urls import include, path

from tests.oauth_as import testing

urlpatterns = [
    path("_test/token-requests", testing.token_requests),
    path("_test/clients", testing.create_client),
    path("", include("oauth2_provider.urls")),
]
