"""What the ledger holds, counted: `fleet status`, `fleet backlog`, the metrics
and a run's report read these.

An item of an open batch is pending in work_items (nothing is written per item
at the claim or the start): the batch rows' counters say how many of their
items are still out (`n_items - n_finished`; a start sets `n_items` to the
items it found still the batch's own), `queued` for a batch no worker started
yet and `running` otherwise. So a count is one `GROUP BY task, status` over
work_items, as before the batches, plus one over the open batch rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

_BATCH_STATE = "CASE WHEN deliveries = 0 THEN 'queued' ELSE 'running' END"


def _in_flight(
    out: dict[str, dict[str, int]], rows: Iterable[Any], *, take_all: bool = False
) -> None:
    """Add the open batches' unfinished items ((task, queued|running, n) rows) to
    `out`, taken off its `pending`: all of n with `take_all` (the run's own
    claims, whose items may not be the run's pending ones), else at most the
    pending there are."""
    for t, status, n in rows:
        by_status = out.setdefault(t, {})
        pending = by_status.get("pending", 0)
        n = int(n) if take_all else min(int(n), pending)
        if n <= 0:
            continue
        by_status[status] = by_status.get(status, 0) + n
        if pending:
            by_status["pending"] = max(pending - n, 0)
            if by_status["pending"] == 0:
                del by_status["pending"]


def counts_since_run(
    session: Session, *, run_id: int, tasks: Sequence[str]
) -> dict[str, dict[str, int]]:
    """A run's own work: {task: {status: n}} of the items of `tasks` whose state
    changed (work_items.updated_at) since the run's started_at, and the items
    of the batches claimed since, queued or running.

    Items another run or command touched meanwhile count too; items that failed
    before the run and were not taken up again do not."""
    out: dict[str, dict[str, int]] = {t: {} for t in tasks}
    for t, status, n in session.execute(
        text(
            """
            SELECT w.task, w.status, count(*)
            FROM work_items w, runs r
            WHERE r.id = :run AND w.updated_at >= r.started_at
              AND w.task = ANY(CAST(:tasks AS text[]))
            GROUP BY 1, 2 ORDER BY 1, 2
            """
        ),
        {"run": run_id, "tasks": list(tasks)},
    ):
        out.setdefault(t, {})[status] = n
    # Items the run claimed are still pending in work_items: their batches say so.
    _in_flight(
        out,
        session.execute(
            text(
                f"""
                SELECT b.task, {_BATCH_STATE}, sum(GREATEST(b.n_items - b.n_finished, 0))
                FROM batches b, runs r
                WHERE r.id = :run AND b.created_at >= r.started_at
                  AND b.task = ANY(CAST(:tasks AS text[]))
                GROUP BY 1, 2
                """
            ),
            {"run": run_id, "tasks": list(tasks)},
        ),
        take_all=True,
    )
    return out


def analyze(session: Session) -> None:
    """Refresh the planner's statistics of the ledger's tables.

    After a bulk change (a million items discovered) the statistics still
    describe the tables as they were until autovacuum analyzes them (a minute
    later, or never where autovacuum is off). ANALYZE reads a fixed sample:
    about 0.3 s at a million items. Without ownership of a table Postgres skips
    it with a warning.
    """
    session.execute(text("ANALYZE work_items, work_queue, batches"))


def counts(session: Session, *, task: str | None = None) -> dict[str, dict[str, int]]:
    """{task: {status: n}} for every task (or one), open batches' items as
    queued or running (see the module's doc)."""
    task_sql = "WHERE task = :task" if task else ""
    out: dict[str, dict[str, int]] = {}
    for t, status, n in session.execute(
        text(
            f"SELECT task, status, count(*) FROM work_items {task_sql} GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        {"task": task},
    ):
        out.setdefault(t, {})[status] = n
    _in_flight(
        out,
        session.execute(
            text(
                f"""
                SELECT task, {_BATCH_STATE}, sum(GREATEST(n_items - n_finished, 0))
                FROM batches {task_sql} GROUP BY 1, 2 ORDER BY 1, 2
                """
            ),
            {"task": task},
        ),
    )
    return out
