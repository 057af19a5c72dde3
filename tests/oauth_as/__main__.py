"""``python -m tests.oauth_as --port N [--parent-pid P]``: migrate the private database, then serve
on 127.0.0.1:N until stopped, or until process P (the test run) is gone.

Started by ``tests/oauth_dot.py`` in a process of its own, whose environment names the settings
module and the database file; the parent holds the port reserved, uvicorn binds beside it.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import django
import uvicorn
from django.core.management import call_command


def _exit_with(parent: int) -> None:
    """A test run killed outright (SIGKILL, a crashed worker) cannot stop its server: the server
    runs in its own session, so nothing else would. It leaves once it is no longer its child."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args()
    if args.parent_pid:
        threading.Thread(target=_exit_with, args=(args.parent_pid,), daemon=True, name="parent-watch").start()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.oauth_as.settings"
    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    from tests.oauth_as.asgi import application

    # Django answers no lifespan events; one worker keeps the counters and SQLite in one process.
    uvicorn.run(application, host="127.0.0.1", port=args.port, lifespan="off", access_log=False,
                log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
