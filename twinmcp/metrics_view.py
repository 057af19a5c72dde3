"""``/metrics``: every process's metrics (uvicorn workers, Celery) through prometheus_client's
multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set, plus the health facts read from the
database at each scrape (``external_mcp.health_metrics``, ``usage.export_metrics``), behind a bearer token or an
allow-listed network."""

from __future__ import annotations

import hmac
import ipaddress
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from external_mcp.health_metrics import HealthFactsCollector
from usage.export_metrics import UsageExportCollector


def _allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_BEARER_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip(), token):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net) for net in settings.METRICS_ALLOWED_NETWORKS)


def metrics(request: HttpRequest) -> HttpResponse:
    if not _allowed(request):
        response = HttpResponse('{"detail": "Metrics need the bearer token or an allowed network."}',
                                status=401, content_type="application/json")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    # Health facts come from the database at each scrape: true even when no check runs any more.
    facts = CollectorRegistry(auto_describe=False)
    facts.register(HealthFactsCollector())
    facts.register(UsageExportCollector())
    return HttpResponse(generate_latest(registry) + generate_latest(facts), content_type=CONTENT_TYPE_LATEST)
