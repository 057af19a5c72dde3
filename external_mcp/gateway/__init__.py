"""The MCP gateway: agents' MCP requests relayed to the external servers of their workspace.

``/api/v1/external-mcp/<server_id>/mcp`` is served by a raw ASGI app, not Django: on a 2-core
machine the sync/async bridging alone costs more than the whole budget (design.md §5). Every
request runs one pipeline (``pipeline.py``): check what the agent sent (``inbound.py``), take
the quota (``quota.py``), forward with the stored credentials (``transport.py``), relay what of
the answer may reach the agent (``relay.py``, ``answers.py``), and settle: record the usage
events, refund what went unanswered, count, log and send the last byte. ``router.py`` splits
traffic between the gateway and Django and owns the process lifespan. Its log lines keep the
logger name operators already filter on, ``external_mcp.proxy``.
"""
