"""The gateway's ASGI app on the test's clock, for ``GatewayProcess``: uvicorn's workers are
spawned interpreters that import this module, so each starts the clock the test chose
(``TWINMCP_TEST_CLOCK``, ISO 8601, running from there) before the app loads. Quota counters are
per UTC day; a gateway on the real clock would split a test's counts if it ran across midnight."""

from __future__ import annotations

import os
from datetime import datetime

import time_machine

time_machine.travel(datetime.fromisoformat(os.environ["TWINMCP_TEST_CLOCK"]), tick=True).start()

from twinmcp.asgi import application  # noqa: E402

__all__ = ["application"]
