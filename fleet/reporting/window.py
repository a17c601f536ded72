"""The window a `fleet report` covers: a `--run` (its runs row's started_at ..
finished_at, or now while it has none), `--since`/`--until` dates or ages, or
by default the latest run; and the errors that say which option to give instead.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


class ReportError(ValueError):
    """Bad options or nothing to report; the message says what to do instead."""


@dataclass(frozen=True)
class Window:
    start: dt.datetime
    end: dt.datetime
    tasks: tuple[str, ...] = ()  # empty: every task
    run_id: int | None = None
    trigger: str | None = None
    open_run: bool = False  # the run has no finished_at: still going, or stopped uncleanly
    timed_out: bool = False


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


def _runs_hint(session: Session) -> str:
    rows = session.execute(
        text("SELECT id, trigger, started_at FROM runs ORDER BY id DESC LIMIT 5")
    ).all()
    if not rows:
        return "no run is recorded yet (`fleet run` records one); use --since DATE instead"
    latest = "; ".join(f"{i} ({t}, {fmt_when(s)})" for i, t, s in rows)
    return f"latest runs: {latest}; or use --since DATE"


def since_hint(session: Session, tasks: tuple[str, ...]) -> str:
    """What to give --since instead, from the latest finished item of `tasks`."""
    task_sql = "AND task = ANY(CAST(:tasks AS text[]))" if tasks else ""
    last = session.execute(
        text(
            f"SELECT max(updated_at) FROM work_items WHERE status IN ('done', 'failed', 'dead') "
            f"{task_sql}"
        ),
        {"tasks": list(tasks)},
    ).scalar_one()
    if last is None:
        which = ", ".join(tasks) if tasks else "any task"
        return f"no item of {which} has finished yet: run `fleet run --task T` first"
    since = (last - dt.timedelta(hours=1)).astimezone().strftime("%Y-%m-%dT%H:%M")
    return f"the latest item finished at {fmt_when(last)}; try --since {since}"


def resolve_window(
    session: Session,
    *,
    run_id: int | None,
    since: str | None,
    until: str | None,
    tasks: tuple[str, ...] = (),
    now: dt.datetime | None = None,
) -> Window:
    now = now or dt.datetime.now().astimezone()
    if run_id is not None and since is not None:
        raise ReportError("give either --run ID or --since DATE (with an optional --until DATE)")
    if run_id is None and since is None:
        if until is not None:
            raise ReportError("--until goes with --since DATE")
        run_id = session.execute(text("SELECT max(id) FROM runs")).scalar_one()
        if run_id is None:
            raise ReportError(f"no option given and {_runs_hint(session)}")
    if run_id is not None:
        if until is not None:
            raise ReportError("--until goes with --since; a --run report covers that run")
        row = session.execute(
            text("SELECT trigger, task, started_at, finished_at, counts FROM runs WHERE id = :i"),
            {"i": run_id},
        ).first()
        if row is None:
            raise ReportError(f"no run with id {run_id}: {_runs_hint(session)}")
        trigger, run_tasks, started, finished, counts = row
        ran = tuple(t for t in (run_tasks or "").split(",") if t)
        if tasks and ran and not set(tasks) <= set(ran):
            other = ", ".join(sorted(set(tasks) - set(ran)))
            raise ReportError(
                f"run {run_id} ran {', '.join(ran)}; --task {other} was not part of it"
            )
        return Window(
            start=started,
            end=finished or now,
            tasks=tasks or ran,
            run_id=run_id,
            trigger=trigger,
            open_run=finished is None,
            timed_out=bool((counts or {}).get("timed_out")),
        )
    assert since is not None
    start = parse_when(since, now=now, option="--since")
    end = parse_when(until, now=now, option="--until") if until is not None else now
    if end <= start:
        raise ReportError(f"--until ({fmt_when(end)}) must be after --since ({fmt_when(start)})")
    return Window(start=start, end=end, tasks=tasks)
