from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from twinmcp.models import Membership


@login_required
def home(request: HttpRequest) -> HttpResponse:
    memberships = Membership.objects.filter(user=request.user).select_related("workspace")
    return render(request, "home.html", {"memberships": memberships})


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
