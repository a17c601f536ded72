"""The `runs` table: one row per driven run (`fleet run`, `fleet nightly`, a
beat-driven nightly run, `fleet demo`), and the report a driver returns.

    insert               the open row: trigger, task label, counts {"task_names": [...], ...}
    merge                counts || {...} while the run goes on (beat ticks)
    close                finished_at = now(), counts || {...}: finished, timed out,
                         interrupted or abandoned, as the merged keys say
    close_with_retries   close through a Postgres outage (the record is worth a wait)
    recorded             a block whose end (any end: Ctrl-C, SIGTERM, an error) closes the row

The row's counts end as `RunReport.summary`: tasks (the run's own work,
{task: {status: n}} of the items whose state changed during it), ledger (every
item of its tasks at the end, older ones included), task_names, discovered,
sent_batches, reconciled, timed_out, interrupted, seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import cast, func, literal, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from db import ledger
from db.engine import transaction
from db.schema import Run
from producer.outage import Outage

log = logging.getLogger("fleet.run")

Counts = dict[str, dict[str, int]]  # {task: {status: items}}

TASK_COLUMN = 64  # runs.task is varchar(64)
CLOSE_TRIES = 10


def task_label(names: Sequence[str]) -> str:
    """What fits the runs.task column: the names joined by commas, or "N tasks"
    when they do not fit (the full list is in the run's counts, `task_names`)."""
    label = ",".join(names)
    if len(label) <= TASK_COLUMN:
        return label
    return f"{len(names)} tasks"


@dataclass
class RunReport:
    """What a driven run did; `fleet run --json` and `fleet nightly --json` print
    run_id, counts, seconds and timed_out.

    counts: {task: {status: items}} of the ledger at the last count (older
    items included: the drive loop waits for every open one); work: the run's
    own work, the same shape over the items whose state changed during the run
    (`work_of`), filled in when the run ends; seconds: wall time of the run;
    discovered: {task: new items}; reconciled: {"returned": n, "dead": n};
    took_over: ids of abandoned nightly runs closed before this one opened;
    taken_over: another driver took this run over during an outage (its row is
    theirs to close); sync: what syncing the declared sources first did."""

    run_id: int
    counts: Counts = field(default_factory=dict)
    work: Counts = field(default_factory=dict)
    seconds: float = 0.0
    timed_out: bool = False
    interrupted: bool = False
    taken_over: bool = False
    discovered: dict[str, int] = field(default_factory=dict)
    sent_batches: int = 0
    reconciled: dict[str, int] = field(default_factory=lambda: {"returned": 0, "dead": 0})
    took_over: list[int] = field(default_factory=list)
    # What syncing the declared sources did first: {source: its db.sync report (as_dict),
    # or {"error": why}}, "rerun": {task: items} with FLEET_RERUN_STALE.
    sync: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_sources(self) -> dict[str, str]:
        """{source: why its sync failed} (the run went on without it)."""
        return {
            name: str(d["error"])
            for name, d in self.sync.items()
            if isinstance(d, dict) and d.get("error")
        }

    def summary(self, names: Sequence[str]) -> dict[str, Any]:
        """The counts the run's row closes with (JSON-ready)."""
        return {
            "tasks": self.work or {n: {} for n in names},
            "ledger": self.counts or {n: {} for n in names},
            "discovered": self.discovered,
            "synced": self.sync,
            "sync_failed": self.failed_sources,
            "sent_batches": self.sent_batches,
            "reconciled": self.reconciled,
            "timed_out": self.timed_out,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 2),
        }


def _jsonb(value: dict[str, Any]) -> Any:
    return cast(literal(value, JSONB), JSONB)


def insert(session: Session, *, trigger: str, names: Sequence[str], **counts: Any) -> int:
    """Insert an open run row over the tasks `names`; returns its id.

    runs.task gets `task_label(names)`; counts get task_names plus `counts`."""
    row = Run(trigger=trigger, task=task_label(names), counts={"task_names": list(names), **counts})
    session.add(row)
    session.flush()
    return row.id


def merge(session: Session, run_id: int, **counts: Any) -> None:
    """Merge `counts` (JSON values) into the row's counts; the run stays open."""
    session.execute(
        update(Run).where(Run.id == run_id).values(counts=Run.counts.op("||")(_jsonb(counts)))
    )


def close(session: Session, run_id: int, **counts: Any) -> None:
    """Set finished_at and merge `counts` (e.g. the summary, or abandoned=reason)."""
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(finished_at=func.now(), counts=Run.counts.op("||")(_jsonb(counts)))
    )


def close_with_retries(url: str, run_id: int, counts: dict[str, Any]) -> bool:
    """Close the row, waiting out a Postgres outage (up to CLOSE_TRIES tries with
    backoff). False, logged, when it could not be recorded; errors that are not
    a lost connection are raised."""
    outage = Outage()
    for _ in range(CLOSE_TRIES):
        try:
            with transaction(url) as session:
                close(session, run_id, **counts)
            return True
        except Exception as exc:
            time.sleep(outage.failed(exc))
    log.error("run %d ended but its end could not be recorded in the runs table", run_id)
    return False


@contextmanager
def recorded(
    url: str, report: RunReport, names: Sequence[str], *, started: float
) -> Iterator[RunReport]:
    """Close `report`'s row when the block ends, however it ends.

    An exception (KeyboardInterrupt, SystemExit from SIGTERM, an error) marks the
    run interrupted and is raised again once the row is closed. `started` is the
    time.monotonic() the run's seconds count from. A run another driver took over
    (`report.taken_over`) is left to that driver."""
    try:
        yield report
    except BaseException:
        report.interrupted = True
        raise
    finally:
        report.seconds = time.monotonic() - started
        if not report.taken_over:
            if report.interrupted:
                _recount(url, report, names)
            _count_work(url, report, names)
            close_with_retries(url, report.run_id, report.summary(names))


def count(url: str, names: Sequence[str]) -> Counts:
    """{task: {status: items}} for each of `names` ({} for a task with none)."""
    with transaction(url) as session:
        return {n: ledger.counts(session, task=n).get(n, {}) for n in names}


def _recount(url: str, report: RunReport, names: Sequence[str]) -> None:
    """The ledger's counts now, for a run stopped between two counting passes
    (best effort: a database that is down leaves the last counts)."""
    try:
        report.counts = count(url, names)
    except Exception as exc:  # the close below retries and says what failed
        log.warning("run %d: could not count its items at the end: %s", report.run_id, exc)


def work_of(url: str, run_id: int, names: Sequence[str]) -> Counts:
    """The run's own work ({task: {status: n}}, db.ledger.counts_since_run)."""
    with transaction(url) as session:
        return ledger.counts_since_run(session, run_id=run_id, tasks=names)


def _count_work(url: str, report: RunReport, names: Sequence[str]) -> None:
    """Fill report.work at the run's end (best effort: a database that is down
    leaves it empty, and the exit status then reads the ledger's counts)."""
    try:
        report.work = work_of(url, report.run_id, names)
    except Exception as exc:
        log.warning("run %d: could not count its own work at the end: %s", report.run_id, exc)
