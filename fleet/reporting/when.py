"""Reading the times `fleet report` is given (--since, --until) and showing them."""

from __future__ import annotations

import datetime as dt
import re


class ReportError(ValueError):
    """Bad options or nothing to report; the message says what to do instead."""


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: str, *, now: dt.datetime, option: str = "--since") -> dt.datetime:
    """An ISO date or time (naive: local time), today/yesterday, or an age (90m, 24h, 7d)."""
    v = value.strip()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if v.lower() == "today":
        return midnight
    if v.lower() == "yesterday":
        return midnight - dt.timedelta(days=1)
    if v.lower() == "now":
        return now
    m = _AGE.match(v)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _AGE_UNITS[m.group(2).lower()])
    try:
        when = dt.datetime.fromisoformat(v)
    except ValueError:
        raise ReportError(
            f"cannot read {option} {value!r}: give an ISO date or time (2026-01-05, "
            "2026-01-05T22:00, optionally with +01:00), today, yesterday, or an age "
            "such as 90m, 24h, 7d"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def fmt_when(t: dt.datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")
