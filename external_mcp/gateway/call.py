"""One proxied HTTP request, carried through every step of the pipeline to ``settle``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from external_mcp.gateway.answers import Screen
from external_mcp.gateway.errors import ProxyError
from external_mcp.proxy_cache import KeyInfo, ServerInfo
from usage.events import Reply
from usage.models import Endpoint, Outcome
from usage.quota import QuotaDecision

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UNKNOWN_SERVER = "unknown"
"""The metric label of every request that names no server of the caller's workspace."""


@dataclass
class Call:
    """One proxied HTTP request and what the usage events need to know about it."""

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key: KeyInfo | None = None
    server: ServerInfo | None = None
    """Set only once the server is known to be the caller's: nothing else is recorded or labelled."""
    body: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)
    batch: bool = False
    counted: int = 0
    quota: QuotaDecision | None = None
    """The quota's admission of this request's counted uses: only then are its events counted."""
    refunded: set[int] = field(default_factory=set)
    """Indexes in ``messages`` of the counted uses given back."""
    screen: Screen | None = None
    status: int = 0
    upstream_status: int | None = None
    bytes_out: int = 0
    outcome: str = Outcome.OK
    error_code: int | None = None
    failure: ProxyError | None = None
    latency_ms: float | None = None
    response_started: bool = False
    streaming: bool = False
    reply_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reply: bytes = b""
    """What ``settle`` sends last: a whole JSON answer, or the end of an event stream."""
    endpoint: str = Endpoint.SERVER
    toolset_id: Any = None
    own_session: str | None = None
    """On an aggregate endpoint, TwinMCP's session id: the agent gets it instead of the upstream's."""
    accepts_events: bool = False
    """The agent accepts an event stream: TwinMCP's own answers then come as one, as SDK servers' do."""
    outgoing: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """On an aggregate endpoint, how a request the upstream sends the agent is renamed, so the
    agent's answer finds its way back to that upstream."""
    incoming: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """On an aggregate endpoint, how the upstream's response is completed for an agent of
    another era than the upstream's."""
    stages: dict[str, float] | None = None
    """With ``EXTERNAL_MCP_STAGE_TIMERS``: milliseconds per stage, for the request's log line."""
    last_lap: float = 0.0

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap (or the start) to ``stage``; free when timers are off,
        so the laps can stay on the hot path."""
        if self.stages is not None:
            now = time.perf_counter()
            self.stages[stage] = round((now - (self.last_lap or self.started)) * 1000, 3)
            self.last_lap = now

    @property
    def server_label(self) -> str:
        """A server's id is a metric label only once it is known to exist in the caller's workspace:
        random or foreign ids share one label, so label sets stay bounded by the registered servers."""
        if self.server is not None:
            return str(self.server.id)
        return UNKNOWN_SERVER if self.endpoint == Endpoint.SERVER or self.key is None else self.endpoint

    @property
    def delivered(self) -> dict[str, Reply]:
        """The responses that reached (or, once settled, will reach) the agent, by id key: a JSON
        answer is all or nothing; a stream's events left as they arrived."""
        if self.screen is None or (self.failure is not None and not self.streaming):
            return {}
        return self.screen.replies
