"""Work handed to Celery from domain code. Tasks are sent by name, so the services, the
notifications and the proxy never import ``external_mcp.tasks`` (which imports them). Queuing is
best effort: a broker that is down must not fail the caller's write or request; the periodic
sweeps (health checks, e-mails) pick the work up."""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app

logger = logging.getLogger(__name__)

CHECK_SERVER = "external_mcp.tasks.check_server"
SEND_EMAILS = "external_mcp.tasks.send_notification_emails"
SEND_REVOCATIONS = "external_mcp.tasks.send_revocations"


def _queue(name: str, *args: Any) -> bool:
    try:
        if current_app.conf.task_always_eager:
            # send_task never runs inline: load the task modules and run it here, as .delay() would.
            current_app.loader.import_default_modules()
            current_app.tasks[name].apply(args=args)
        else:
            current_app.send_task(name, args=args)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        logger.warning("could not queue %s (%s); the next sweep will do it", name.rsplit(".", 1)[-1], exc)
        return False
    return True


def queue_check(server_id: object) -> bool:
    """Check a server now (registered, changed, or its tools changed) rather than at the next sweep."""
    return _queue(CHECK_SERVER, str(server_id))


def queue_emails(notification_ids: list[str]) -> bool:
    return _queue(SEND_EMAILS, notification_ids)


def queue_revocations(revocation_ids: list[str]) -> bool:
    return _queue(SEND_REVOCATIONS, revocation_ids)
