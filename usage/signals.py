"""``external_mcp_usage_event``: sent once per committed batch of usage events, with
``events`` = the list of event dicts (the story's ExternalMcpUsageEvent). Receivers run in the
gateway's event loop thread: they must be quick and must not block (queue work elsewhere)."""

from django.dispatch import Signal

external_mcp_usage_event = Signal()
