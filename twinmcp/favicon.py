"""``/favicon.ico``: browsers and crawlers ask for it whatever the page links, so it redirects to
the SVG icon instead of filling the logs with 404s."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseRedirect
from django.templatetags.static import static
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_safe


@require_safe
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> HttpResponseRedirect:
    return HttpResponseRedirect(static("favicon.svg"))
