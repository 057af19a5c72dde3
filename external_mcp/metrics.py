"""The product's Prometheus metrics. Labels carry server ids, never URLs or users, so
cardinality is bounded by the number of registered servers: the proxy labels a request with a
server's id only once it knows the server is the caller's, every other request with
``gateway.call.UNKNOWN_SERVER`` (docs/architecture.md, "Metric labels"). Availability and the other
health facts are read from the database at scrape time (``external_mcp.health_metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

LATENCY = Histogram(
    "external_mcp_latency_seconds", "Latency of health checks (kind=health) and proxied calls (kind=proxy).",
    ["server_id", "kind"], buckets=LATENCY_BUCKETS,
)
ERRORS = Counter(
    "external_mcp_errors_total", "Errors talking to external MCP servers, by error class.",
    ["server_id", "kind", "error_class"],
)
HEALTH_CHECKS = Counter(
    "external_mcp_health_checks_total", "Health checks by result (ok, failure).", ["server_id", "result"],
)
REQUESTS = Counter(
    "external_mcp_requests_total", "Proxied MCP requests by method and outcome.", ["server_id", "method", "outcome"],
)
QUOTA_REJECTIONS = Counter(
    "external_mcp_quota_rejections_total", "Proxied calls refused because the daily quota is used up.",
    ["server_id"],
)
