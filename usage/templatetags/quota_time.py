"""How long until a quota resets, in words people read at a glance ("in 5 h 12 min")."""

from __future__ import annotations

import math
from datetime import datetime

from django import template
from django.utils import timezone

register = template.Library()


def time_until(moment: datetime, now: datetime | None = None) -> str:
    """Whole minutes, rounded up: "in 0 min" would read as if the reset had already happened."""
    minutes = max(0, math.ceil(((moment - (now or timezone.now())).total_seconds()) / 60))
    hours, minutes = divmod(minutes, 60)
    if hours and minutes:
        return f"in {hours} h {minutes} min"
    if hours:
        return f"in {hours} h"
    return f"in {minutes} min"


@register.filter(name="until")
def until(moment: datetime | None) -> str:
    return time_until(moment) if moment else ""
