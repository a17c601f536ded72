"""What `fleet report` shows, read from the ledger for a run or a time window.

A window's work is every outcome that happened inside it: an item that reached
done, failed, dead or parked (`work_items.updated_at`; a parked item counts
as failed, and parking leaves updated_at alone), plus every result made inside
it that was replaced since (`result_history.classified_at`: the content
changed, a rerun, the source row went away), so a run's figures do not shrink
after the fact. A `--run` window is the `runs` row's started_at..finished_at
(now, while it has none); no option: the latest run. Every query here is one
grouped statement over that window, so a report over millions of items reads
counts, never rows.

Throughput over a date window divides by the busy time: first to last finish
less every gap longer than IDLE_GAP_SECONDS with nothing finished (the hours
between two nightly runs are not the fleet's speed).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from db.syncstate import SourceStatus, read_problems, read_sources
from fleet.observe.cascade import CascadeStatus, read_cascades
from fleet.reporting.charts import time_step
from fleet.reporting.labelsets import LabelRates, read_label_rates
from fleet.reporting.reasons import reason_key
from fleet.reporting.review import read_agreement
from fleet.reporting.window import ReportError, Window, fmt_when, resolve_window, since_hint

# Throughput bins: enough to show a trend, few enough that each holds several
# batches (a bin of one batch or none draws batch cadence, not throughput).
MIN_BINS, MAX_BINS, ITEMS_PER_BIN = 12, 60, 40
# A pause this long with nothing finished is idle time, not work (see busy_s).
IDLE_GAP_SECONDS = 300.0


@dataclass
class TaskRow:
    task: str
    done: int = 0
    failed: int = 0
    dead: int = 0
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    latency_p50_ms: float | None = None

    @property
    def items(self) -> int:
        return self.done + self.failed + self.dead


@dataclass(frozen=True)
class TierUse:
    task: str
    tier: int
    model: str
    done: int
    failed: int


@dataclass(frozen=True)
class FailureGroup:
    task: str
    reason: str
    failed: int
    dead: int
    example: str


@dataclass(frozen=True)
class RunRef:
    id: int
    trigger: str
    tasks: str
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass
class ReportData:
    window: Window
    rows: list[TaskRow]
    axis: tuple[dt.datetime, dt.datetime]
    bin_seconds: int
    throughput: dict[str, list[int]]  # items finished per bin, per task
    labels: dict[str, list[tuple[str | None, int]]]
    tiers: list[TierUse]
    failures: list[FailureGroup]
    runs: list[RunRef]
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now().astimezone())
    database: str = ""
    latency_p50_ms: float | None = None  # over every task
    sources: dict[str, SourceStatus] = field(default_factory=dict)  # synced [sources.*]
    problems: list[dict[str, Any]] = field(default_factory=list)  # newest sync_problems rows
    busy_s: float | None = None  # first to last finish less idle gaps (date windows)
    # task -> reviewer's label -> {"reviewed", "agreed"} (fleet.reporting.review)
    review: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # cheap task -> its cascade's share and cost, all time (fleet.observe.cascade)
    cascades: dict[str, CascadeStatus] = field(default_factory=dict)
    # task -> `fleet.reporting.export.evaluate` against the gold labels given for it
    # (ece, reliability bins, accuracy, n); empty without --gold.
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    # multi-label task -> items and per-label counts per throughput bin (labelsets)
    label_rates: dict[str, LabelRates] = field(default_factory=dict)

    @property
    def total(self) -> TaskRow:
        t = TaskRow("all tasks")
        for r in self.rows:
            t.done, t.failed, t.dead = t.done + r.done, t.failed + r.failed, t.dead + r.dead
        firsts = [r.first for r in self.rows if r.first]
        lasts = [r.last for r in self.rows if r.last]
        t.first, t.last = (min(firsts), max(lasts)) if firsts and lasts else (None, None)
        t.latency_p50_ms = self.latency_p50_ms
        return t

    @property
    def duration_s(self) -> float:
        """The run's length; for a date window, the busy time (first to last
        finish less gaps over IDLE_GAP_SECONDS), seconds."""
        if self.window.run_id is not None:
            return (self.window.end - self.window.start).total_seconds()
        if self.busy_s is not None:
            return self.busy_s
        t = self.total
        return (t.last - t.first).total_seconds() if t.first and t.last else 0.0

    @property
    def items_per_s(self) -> float | None:
        return self.total.items / self.duration_s if self.duration_s > 0 else None

    @property
    def trigger_text(self) -> str:
        if self.window.trigger is not None:
            return self.window.trigger
        if not self.runs:
            return "no run recorded"
        by: dict[str, list[int]] = {}
        for r in self.runs:
            by.setdefault(r.trigger, []).append(r.id)
        return ", ".join(
            f"{t} (run{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"
            for t, ids in by.items()
        )


# -- reading the ledger -----------------------------------------------------------


def _finished_cte(window: Window) -> str:
    """`fin`: one row per outcome in the window (task, status, updated_at,
    last_error, label, model_tier, model_name, latency_ms): finished work items
    with their result, and replaced results from result_history (done)."""
    task_sql = "AND w.task = ANY(CAST(:tasks AS text[]))" if window.tasks else ""
    history_sql = "AND h.task = ANY(CAST(:tasks AS text[]))" if window.tasks else ""
    return f"""
        WITH fin AS (
            SELECT w.task, CASE w.status WHEN 'parked' THEN 'failed' ELSE w.status END AS status,
                   w.updated_at, w.last_error, r.label, r.model_tier, r.model_name, r.latency_ms
            FROM work_items w
            LEFT JOIN results r ON r.work_item_id = w.id
            WHERE w.status IN ('done', 'failed', 'dead', 'parked')
              AND w.updated_at >= :start AND w.updated_at <= :end {task_sql}
            UNION ALL
            SELECT h.task, 'done', h.classified_at, NULL, h.label, h.model_tier, h.model_name,
                   NULL
            FROM result_history h
            WHERE h.classified_at >= :start AND h.classified_at <= :end {history_sql}
        )
    """


def _params(window: Window, **extra: Any) -> dict[str, Any]:
    return {"start": window.start, "end": window.end, "tasks": list(window.tasks), **extra}


def _read_rows(session: Session, window: Window) -> tuple[list[TaskRow], float | None]:
    """Counts per task and status, first and last finish, median latency; and the
    median latency over every task."""
    rows: dict[str, TaskRow] = {}
    overall: float | None = None
    for task, status, n, first, last in session.execute(
        text(
            _finished_cte(window)
            + "SELECT task, status, count(*), min(updated_at), max(updated_at) "
            "FROM fin GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        _params(window),
    ):
        r = rows.setdefault(task, TaskRow(task))
        setattr(r, status, n)
        r.first = first if r.first is None else min(r.first, first)
        r.last = last if r.last is None else max(r.last, last)
    for task, p50 in session.execute(
        text(
            _finished_cte(window)
            + "SELECT task, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) "
            "FROM fin WHERE status = 'done' GROUP BY GROUPING SETS ((task), ())"
        ),
        _params(window),
    ):
        if task is None:  # the grouping set over every task
            overall = None if p50 is None else float(p50)
        elif task in rows and p50 is not None:
            rows[task].latency_p50_ms = float(p50)
    return sorted(rows.values(), key=lambda r: (-r.items, r.task)), overall


def _axis(window: Window, rows: list[TaskRow]) -> tuple[dt.datetime, dt.datetime, int, int]:
    """(start, end, bin seconds, bins): the run's window, or first to last finish.
    Bins are whole, so every point is a rate over the same length of time."""
    if window.run_id is not None:
        start, end = window.start, window.end
    else:
        start = min(r.first for r in rows if r.first)
        end = max(r.last for r in rows if r.last)
    span = max((end - start).total_seconds(), 1.0)
    items = sum(r.items for r in rows)
    width = time_step(span, min(max(items // ITEMS_PER_BIN, MIN_BINS), MAX_BINS))
    bins = max(math.ceil(span / width), 1)
    if window.run_id is None and bins * width <= span:
        bins += 1  # the last finish sits exactly on a bin edge
    return start, start + dt.timedelta(seconds=bins * width), width, bins


def _read_throughput(
    session: Session, window: Window, rows: list[TaskRow], start: dt.datetime, width: int, bins: int
) -> dict[str, list[int]]:
    out = {r.task: [0] * bins for r in rows}
    for task, k, n in session.execute(
        text(
            _finished_cte(window)
            + "SELECT task, floor(extract(epoch FROM updated_at - CAST(:x0 AS timestamptz)) "
            "/ :w)::bigint, count(*) FROM fin GROUP BY 1, 2"
        ),
        _params(window, x0=start, w=width),
    ):
        out[task][min(max(int(k), 0), bins - 1)] += n
    return out


def _read_labels(session: Session, window: Window) -> dict[str, list[tuple[str | None, int]]]:
    out: dict[str, list[tuple[str | None, int]]] = {}
    for task, label, n in session.execute(
        text(
            _finished_cte(window) + "SELECT task, label, count(*) FROM fin "
            "WHERE status = 'done' GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
        ),
        _params(window),
    ):
        out.setdefault(task, []).append((label, n))
    return out


def _read_tiers(session: Session, window: Window) -> list[TierUse]:
    got: dict[tuple[str, int, str], dict[str, int]] = {}
    for task, tier, model, status, n in session.execute(
        text(
            _finished_cte(window)
            + "SELECT task, model_tier, model_name, status, count(*) FROM fin "
            "WHERE model_name IS NOT NULL GROUP BY 1, 2, 3, 4"
        ),
        _params(window),
    ):
        got.setdefault((task, tier, model), {})[status] = n
    return [
        TierUse(task, tier, model, c.get("done", 0), c.get("failed", 0) + c.get("dead", 0))
        for (task, tier, model), c in sorted(got.items())
    ]


def _read_failures(session: Session, window: Window) -> list[FailureGroup]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for task, status, error, n in session.execute(
        text(
            _finished_cte(window)
            + "SELECT task, status, left(last_error, 1000), count(*) FROM fin "
            "WHERE status IN ('failed', 'dead') GROUP BY 1, 2, 3"
        ),
        _params(window),
    ):
        g = groups.setdefault(
            (task, reason_key(error)), {"failed": 0, "dead": 0, "example": error or ""}
        )
        g[status] += n
    out = [
        FailureGroup(task, reason, g["failed"], g["dead"], g["example"])
        for (task, reason), g in groups.items()
    ]
    return sorted(out, key=lambda f: (-(f.failed + f.dead), f.task, f.reason))


def _read_busy(session: Session, window: Window) -> float:
    """Seconds from the first to the last finish in the window, less every gap
    longer than IDLE_GAP_SECONDS between two consecutive finishes."""
    busy = session.execute(
        text(
            _finished_cte(window)
            + "SELECT coalesce(sum(gap) FILTER (WHERE gap <= :idle), 0) FROM ("
            "SELECT extract(epoch FROM updated_at - lag(updated_at) OVER (ORDER BY updated_at)) "
            "AS gap FROM fin) g"
        ),
        _params(window, idle=IDLE_GAP_SECONDS),
    ).scalar_one()
    return float(busy)


def _read_runs(session: Session, window: Window) -> list[RunRef]:
    rows = session.execute(
        text(
            "SELECT id, trigger, coalesce(task, ''), started_at, finished_at FROM runs "
            "WHERE started_at <= :end AND coalesce(finished_at, now()) >= :start ORDER BY id"
        ),
        _params(window),
    ).all()
    return [RunRef(*r) for r in rows]


def collect(session: Session, window: Window) -> ReportData:
    """Everything the page shows; ReportError when nothing finished in the window."""
    rows, p50 = _read_rows(session, window)
    if not rows:
        tasks = f" for {', '.join(window.tasks)}" if window.tasks else ""
        what = (
            f"run {window.run_id} ({window.trigger}) finished no items{tasks}"
            if window.run_id is not None
            else f"no results{tasks}"
        )
        raise ReportError(
            f"{what} between {fmt_when(window.start)} and {fmt_when(window.end)}; "
            f"{since_hint(session, window.tasks)}"
        )
    start, end, width, bins = _axis(window, rows)
    return ReportData(
        window=window,
        rows=rows,
        axis=(start, end),
        bin_seconds=width,
        throughput=_read_throughput(session, window, rows, start, width, bins),
        labels=_read_labels(session, window),
        tiers=_read_tiers(session, window),
        failures=_read_failures(session, window),
        runs=_read_runs(session, window),
        latency_p50_ms=p50,
        sources=read_sources(session),
        problems=read_problems(session),
        busy_s=_read_busy(session, window) if window.run_id is None else None,
        review=read_agreement(session, [r.task for r in rows]),
        cascades=read_cascades(session, [r.task for r in rows]),
        label_rates=read_label_rates(session, window, start, width, bins),
    )


def read_report(
    url: str,
    *,
    run_id: int | None = None,
    since: str | None = None,
    until: str | None = None,
    tasks: tuple[str, ...] = (),
) -> ReportData:
    from db.engine import transaction

    with transaction(url) as session:
        # One snapshot for every query: items finishing meanwhile cannot make the
        # summary and the charts disagree.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        window = resolve_window(session, run_id=run_id, since=since, until=until, tasks=tasks)
        data = collect(session, window)
    data.database = make_url(url).database or ""
    return data
