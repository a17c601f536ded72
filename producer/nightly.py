"""The nightly run: discover every configured task, feed the queues under
backpressure, reconcile, and record one `runs` row (trigger 'nightly').

Two drivers share this core:

- `fleet nightly` (cron, a Kubernetes CronJob): `drive` opens the run and
  takes it to the end in the foreground with the drive loop of
  producer.drive, holding a Postgres session advisory lock on the run for as
  long as the process lives.
- `fleet beat`: the crontab entry calls `start`, which opens the run, discovers
  and sends what backpressure allows, and returns; `tick`, every
  beat_feed_seconds, tops the queues up and closes the run once nothing is
  pending, queued or running, with the same feed and count. No scheduled
  task blocks for hours. The row itself is written by producer.runs.

One nightly run at a time. Opening one takes a transaction advisory lock, so
two starters never both pass the check, then looks for an open nightly row:

    open row, its driver alive    -> RunStillGoing (nothing started)
    open row, its driver gone     -> closed as abandoned, a new run starts
      foreground: its session lock is free (the process died)
      beat: no tick for `beat_stale_after` seconds (no control worker)

The ledger, not the run row, knows what is unfinished: a run closed as
abandoned or timed out leaves its items pending/queued, and the next run or
the reconciler picks them up.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from config.settings import Settings
from config.taskconfig import TaskSpec
from db import ledger
from db.engine import get_engine, transaction
from db.schema import Run
from producer import runs
from producer.drive import discover_all, feed, open_items
from producer.drive import drive as drive_run
from producer.runs import Counts, RunReport, count
from producer.sync import before_discovery

log = logging.getLogger("fleet.nightly")

TRIGGER = "nightly"
FOREGROUND, BEAT = "foreground", "beat"
# Advisory lock keys (bigint). OPEN_KEY serializes opening a nightly run; a
# foreground driver holds run_key(id) for the life of its run.
OPEN_KEY = 0x666C_6565_7400_0000


class RunStillGoing(RuntimeError):
    """A nightly run is open and its driver is alive: no second one starts."""

    def __init__(self, run: OpenRun) -> None:
        super().__init__(
            f"nightly run {run.run_id} ({run.mode}, {run.holder}, started "
            f"{run.started_at:%Y-%m-%d %H:%M:%S %Z}) is still going: not starting a second one"
        )
        self.run = run


@dataclass(frozen=True)
class OpenRun:
    """An open nightly runs row: its driver's mode (FOREGROUND or BEAT), holder
    ("host:pid" or the control worker's name) and last feed tick (beat)."""

    run_id: int
    started_at: dt.datetime
    mode: str
    holder: str
    last_tick: dt.datetime | None


def run_key(run_id: int) -> int:
    """The advisory lock key a foreground driver of run `run_id` holds."""
    return OPEN_KEY + 1 + run_id


def holder_name() -> str:
    """This process as a run's holder: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat_stale_after(settings: Settings) -> float:
    """Seconds without a feed tick after which a beat-driven run counts as abandoned."""
    return max(float(settings.lease_seconds), 30 * settings.beat_feed_seconds)


def is_abandoned(run: OpenRun, *, now: dt.datetime, holder_alive: bool, stale_after: float) -> bool:
    """Pure: has the driver of an open run gone away?"""
    if run.mode == FOREGROUND:
        return not holder_alive
    last = run.last_tick or run.started_at
    return (now - last).total_seconds() > stale_after


# -- one nightly run at a time ---------------------------------------------------------


def _open_runs(session: Session) -> list[OpenRun]:
    rows = session.scalars(
        select(Run)
        .where(Run.trigger == TRIGGER, Run.finished_at.is_(None), Run.counts.has_key("mode"))
        .order_by(Run.id)
    ).all()
    out = []
    for r in rows:
        tick = r.counts.get("last_tick")
        out.append(
            OpenRun(
                r.id,
                r.started_at,
                str(r.counts.get("mode")),
                str(r.counts.get("holder", "?")),
                dt.datetime.fromisoformat(tick) if tick else None,
            )
        )
    return out


def _holder_alive(session: Session, run: OpenRun) -> bool:
    if run.mode != FOREGROUND:
        return True
    # Free (we get it, released at commit) means the driving process is gone.
    got = session.scalar(select(func.pg_try_advisory_xact_lock(run_key(run.run_id))))
    return not got


def open_run(
    session: Session,
    names: Sequence[str],
    *,
    mode: str,
    holder: str,
    stale_after: float,
) -> tuple[int, list[int]]:
    """Insert the open runs row unless a live nightly run exists.

    Returns (run id, ids of abandoned runs closed first); raises RunStillGoing."""
    session.execute(select(func.pg_advisory_xact_lock(OPEN_KEY)))
    now = session.scalar(select(func.now()))
    assert now is not None
    took_over = []
    for run in _open_runs(session):
        alive = _holder_alive(session, run)
        if not is_abandoned(run, now=now, holder_alive=alive, stale_after=stale_after):
            raise RunStillGoing(run)
        reason = (
            "its process is gone"
            if run.mode == FOREGROUND
            else f"no feed tick for over {stale_after:.0f}s"
        )
        log.warning(
            "nightly run %d (%s, %s) abandoned: %s", run.run_id, run.mode, run.holder, reason
        )
        runs.close(session, run.run_id, abandoned=reason)
        took_over.append(run.run_id)
    run_id = runs.insert(
        session, trigger=TRIGGER, names=names, mode=mode, holder=holder, last_tick=now.isoformat()
    )
    return run_id, took_over


# -- foreground: `fleet nightly` -----------------------------------------------------


def drive(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[Counts], None] | None = None,
    holder: str | None = None,
    gate: Callable[[str], bool] | None = None,
) -> RunReport:
    """Open a nightly run and drive it to the end in this process
    (producer.drive.drive, after syncing the declared sources).

    `poll`, `progress` and `gate` as in producer.drive.drive; `holder` defaults
    to holder_name(). The row closes however the run ends (interrupted on an
    exception, which is raised again), unless another driver took the run over
    during an outage. Raises RunStillGoing when another nightly run is alive."""
    started = time.monotonic()
    names = [s.name for s in specs]
    # A dedicated connection holds the run's session lock while this process drives it.
    lock = _RunLock(url)
    try:
        with Session(bind=lock.connect()) as session, session.begin():
            run_id, took_over = open_run(
                session,
                names,
                mode=FOREGROUND,
                holder=holder or holder_name(),
                stale_after=beat_stale_after(settings),
            )
            session.execute(select(func.pg_advisory_lock(run_key(run_id))))
        lock.run_id = run_id
        report = RunReport(run_id, took_over=took_over)
        log.info("nightly run %d opened over %s", run_id, ", ".join(names))
        with runs.recorded(url, report, names, started=started):
            drive_run(
                url,
                app,
                specs,
                settings,
                report,
                started=started,
                timeout=timeout,
                poll=poll,
                progress=progress,
                gate=gate,
                sync=True,
                held=lock.retake,
            )
        lock.release()
    finally:
        lock.close()
    return report


class _RunLock:
    """The session-level advisory lock that says "this process drives run N".

    Postgres drops it with the connection, e.g. when the server restarts; after
    an outage the driver takes it again on a fresh connection, unless another
    `fleet nightly` took the run over meanwhile (then this one stops)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id: int | None = None
        self._conn: Connection | None = None

    def connect(self) -> Connection:
        self.close()
        self._conn = get_engine(self.url).connect()
        return self._conn

    def retake(self) -> bool:
        """After an outage: True when this process still (or again) holds the run."""
        assert self.run_id is not None
        conn = self._conn
        try:
            if conn is not None:
                conn.execute(select(1))
                conn.commit()
                return True  # the connection, and with it the lock, survived
        except Exception:
            log.warning(
                "nightly run %d: the lock connection was lost; taking it again", self.run_id
            )
        conn = self.connect()
        got = conn.execute(select(func.pg_try_advisory_lock(run_key(self.run_id)))).scalar()
        conn.commit()
        if not got:
            return False
        with Session(bind=conn) as session:
            finished = session.execute(
                select(Run.finished_at).where(Run.id == self.run_id)
            ).scalar_one()
            session.commit()
        return finished is None

    def release(self) -> None:
        if self._conn is not None and self.run_id is not None:
            try:
                self._conn.execute(select(func.pg_advisory_unlock(run_key(self.run_id))))
                self._conn.commit()
            except Exception:  # the lock went with its connection
                pass

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


# -- under `fleet beat`: start on the crontab, then tick ---------------------------------


def start(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    holder: str,
    sync: bool = True,
) -> dict[str, Any]:
    """Open a beat-driven nightly run, discover, send what backpressure allows.

    `sync` False: the sources were just synced (a `fleet beat` sync tick that
    found changes, continuous mode); a run still going then discovers the new
    rows for its next tick to feed.

    Returns {"run_id", "discovered", "took_over", "sent_batches", "open_items"},
    or {"still_going": run id} when a run is still going (not raised)."""
    names = [s.name for s in specs]
    try:
        with transaction(url) as session:
            run_id, took_over = open_run(
                session, names, mode=BEAT, holder=holder, stale_after=beat_stale_after(settings)
            )
    except RunStillGoing as e:
        if sync:
            log.warning("%s", e)
            return {"still_going": e.run.run_id}
        return {"still_going": e.run.run_id, "discovered": discover_all(url, specs)}
    synced = before_discovery(settings, specs) if sync else {}
    failed = {n: d["error"] for n, d in synced.items() if isinstance(d, dict) and d.get("error")}
    discovered = discover_all(url, specs)
    with transaction(url) as session:
        runs.merge(session, run_id, discovered=discovered, synced=synced, sync_failed=failed)
    log.info(
        "nightly run %d opened over %s: %d new items",
        run_id,
        ", ".join(names),
        sum(discovered.values()),
    )
    summary: dict[str, Any] = {
        "run_id": run_id,
        "discovered": discovered,
        "took_over": took_over,
        "sync_failed": failed,
    }
    summary.update(tick(url, app, {s.name: s for s in specs}, settings) or {})
    return summary


def tick(
    url: str, app: Celery, tasks: dict[str, TaskSpec], settings: Settings
) -> dict[str, Any] | None:
    """Top up the queues of the open beat-driven run; close it when its work is done.

    Returns {"run_id", "sent_batches", "open_items"}; None when no such run is
    open (or another tick holds it)."""
    with transaction(url) as session:
        run = session.scalars(
            select(Run)
            .where(
                Run.trigger == TRIGGER,
                Run.finished_at.is_(None),
                Run.counts["mode"].astext == BEAT,
            )
            .order_by(Run.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if run is None:
            return None
        names = [str(n) for n in run.counts.get("task_names", [])]
        specs = [tasks[n] for n in names if n in tasks]
        missing = [n for n in names if n not in tasks]
        if missing:
            log.warning("nightly run %d: tasks %s are no longer configured", run.id, missing)
        sent = sum(feed(url, app, spec, settings) for spec in specs)
        counts = count(url, [s.name for s in specs])
        now = session.scalar(select(func.now()))
        assert now is not None
        values: dict[str, Any] = {
            "ledger": counts,
            "sent_batches": int(run.counts.get("sent_batches", 0)) + sent,
            "last_tick": now.isoformat(),
        }
        remaining = open_items(counts)
        if remaining == 0:
            values["seconds"] = round((now - run.started_at).total_seconds(), 2)
            values["timed_out"] = False
            values["tasks"] = ledger.counts_since_run(
                session, run_id=run.id, tasks=[s.name for s in specs]
            )
            runs.close(session, run.id, **values)
            log.info("nightly run %d finished: %s", run.id, counts)
        else:
            runs.merge(session, run.id, **values)
        return {"run_id": run.id, "sent_batches": sent, "open_items": remaining}
