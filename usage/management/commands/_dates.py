"""Date arguments of the usage commands: parsed in ``handle`` so a bad value is one error line."""

from __future__ import annotations

from datetime import date

from django.core.management.base import CommandError


def parse_day(value: str, option: str) -> date:
    try:
        return date.fromisoformat(value.strip()) if len(value.strip()) == 10 else date.fromisoformat("x")
    except ValueError:
        raise CommandError(f"{option}: {value!r} is not a date; expected YYYY-MM-DD (UTC).") from None


def day_range(day: str | None, since: str | None, today: date) -> tuple[date, date] | None:
    """(first, last) from --day or --since (to today); None when neither is given."""
    if day and since:
        raise CommandError("Use either --day or --since, not both.")
    if day:
        first = last = parse_day(day, "--day")
        option = "--day"
    elif since:
        first, last = parse_day(since, "--since"), today
        option = "--since"
    else:
        return None
    if first > today:
        raise CommandError(f"{option}: {first} is in the future (today is {today} UTC).")
    return first, last
