"""The nightly run: discover every configured task, feed the queues under
backpressure, reconcile, and record one `runs` row (trigger 'nightly').

Two drivers share this core:

- `fleet nightly` (cron, a Kubernetes CronJob): `drive` opens the run and
  takes it to the end in the foreground, holding a Postgres session advisory
  lock on the run for as long as the process lives.
- `fleet beat`: the crontab entry calls `start`, which opens the run, discovers
  and sends what backpressure allows, and returns; `tick`, every
  beat_feed_seconds, tops the queues up and closes the run once nothing is
  pending, queued or running. No scheduled task blocks for hours.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Connection, cast, func, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from db import ledger
from db.engine import get_engine, transaction
from db.schema import Run
from fleet.config.settings import Settings
from fleet.config.taskconfig import TaskSpec
from producer.enqueue import discover
from producer.reconciler import reconcile
from producer.runner import Feeder, Outage, ServedWatch, feed, gated, task_label
from producer.sync import before_discovery

log = logging.getLogger("fleet.nightly")

TRIGGER = "nightly"
FOREGROUND, BEAT = "foreground", "beat"
OPEN_STATUSES = ("pending", "queued", "running")
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
    run_id: int
    started_at: dt.datetime
    mode: str
    holder: str
    last_tick: dt.datetime | None


@dataclass
class NightlyReport:
    run_id: int
    counts: dict[str, dict[str, int]]
    seconds: float
    timed_out: bool = False
    discovered: dict[str, int] = field(default_factory=dict)
    sent_batches: int = 0
    reconciled: dict[str, int] = field(default_factory=lambda: {"returned": 0, "dead": 0})
    took_over: list[int] = field(default_factory=list)
    interrupted: bool = False
    taken_over: bool = False  # another driver took the run over during an outage


def run_key(run_id: int) -> int:
    return OPEN_KEY + 1 + run_id


def holder_name() -> str:
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


def open_items(counts: dict[str, dict[str, int]]) -> int:
    return sum(c.get(s, 0) for c in counts.values() for s in OPEN_STATUSES)


def run_specs(tasks: dict[str, TaskSpec], names: Iterable[str] | None = None) -> list[TaskSpec]:
    """The tasks a nightly run covers: the named ones (all configured if none)
    plus the tasks that follow them (transcribe -> audio_intent)."""
    chosen = [tasks[n] for n in names] if names else list(tasks.values())
    for spec in list(chosen):
        chosen += [tasks[t] for t in spec.then if tasks[t] not in chosen]
    return chosen


# -- the runs row ------------------------------------------------------------------


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


def _close(session: Session, run_id: int, **counts: Any) -> None:
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(finished_at=func.now(), counts=Run.counts.op("||")(_jsonb(counts)))
    )


def _jsonb(value: dict[str, Any]) -> Any:
    return cast(literal(value, JSONB), JSONB)


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
        _close(session, run.run_id, abandoned=reason)
        took_over.append(run.run_id)
    row = Run(
        trigger=TRIGGER,
        task=task_label(names),
        counts={
            "mode": mode,
            "holder": holder,
            "task_names": list(names),
            "last_tick": now.isoformat(),
        },
    )
    session.add(row)
    session.flush()
    return row.id, took_over


def _discover_all(
    url: str, specs: Sequence[TaskSpec], settings: Settings | None = None
) -> dict[str, int]:
    if settings is not None:  # `fleet sync` of the declared sources (FLEET_RERUN_STALE) first
        before_discovery(settings, specs)
    # Follow-up tasks (input_from) are created by the task they follow.
    return {s.name: discover(url, s) for s in specs if not s.input_from}


def _counts(url: str, names: Sequence[str]) -> dict[str, dict[str, int]]:
    with transaction(url) as session:
        every = ledger.counts(session)
    return {n: every.get(n, {}) for n in names}


# -- foreground: `fleet nightly` -----------------------------------------------------


def drive(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
    holder: str | None = None,
    gate: Callable[[str], bool] | None = None,
) -> NightlyReport:
    """Open a nightly run and drive it to the end in this process.

    `gate` as in producer.runner.run_until_done (local workers). Raises
    RunStillGoing when another nightly run is alive."""
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
        report = NightlyReport(run_id, {}, 0.0, took_over=took_over)
        log.info("nightly run %d opened over %s", run_id, ", ".join(names))
        try:
            _drive_loop(
                url, app, specs, settings, report, timeout, poll, progress, started, lock, gate
            )
        except BaseException:  # Ctrl-C, SIGTERM, a lost service: the row still closes
            report.interrupted = True
            raise
        finally:
            report.seconds = time.monotonic() - started
            if not report.taken_over:
                _close_with_retries(url, run_id, _summary(report, names))
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


def _close_with_retries(url: str, run_id: int, summary: dict[str, Any]) -> None:
    outage = Outage()
    for _ in range(10):  # Postgres may be restarting right now: the record is worth a wait
        try:
            with transaction(url) as session:
                _close(session, run_id, **summary)
            return
        except Exception as exc:
            time.sleep(outage.failed(exc))
    log.error("nightly run %d ended but its end could not be recorded in the runs table", run_id)


def _drive_loop(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    report: NightlyReport,
    timeout: float | None,
    poll: float,
    progress: Callable[[dict[str, dict[str, int]]], None] | None,
    started: float,
    lock: _RunLock,
    gate: Callable[[str], bool] | None = None,
) -> None:
    names = [s.name for s in specs]
    last_reconcile = time.monotonic()
    outage = Outage()
    watch = ServedWatch(settings.redis_url())
    feeder = Feeder(settings)  # batches sized by cost; the poll below refills
    discovered = False
    while True:
        try:
            if not discovered:
                report.discovered = _discover_all(url, specs, settings)
                discovered = True
            if outage.failures and not lock.retake():
                log.error(
                    "nightly run %d was taken over by another driver during the outage; "
                    "this one stops",
                    report.run_id,
                )
                report.taken_over = True
                return
            if time.monotonic() - last_reconcile >= settings.reconcile_interval:
                got = reconcile(url, max_attempts=settings.max_attempts)
                for k in got:
                    report.reconciled[k] = report.reconciled.get(k, 0) + got[k]
                last_reconcile = time.monotonic()
            for spec in gated(specs, gate):
                report.sent_batches += feeder.feed(url, app, spec)
            report.counts = _counts(url, names)
        except Exception as exc:
            delay = outage.failed(exc)  # re-raises anything but a lost connection
            if timeout is not None and time.monotonic() - started + delay > timeout:
                report.timed_out = True
                return
            time.sleep(delay)
            continue
        outage.recovered()
        watch.check([s.name for s in gated(specs, gate)], report.counts)
        if progress:
            progress(report.counts)
        if open_items(report.counts) == 0:
            return
        if timeout is not None and time.monotonic() - started > timeout:
            report.timed_out = True
            return
        time.sleep(poll)


def _summary(report: NightlyReport, names: Sequence[str]) -> dict[str, Any]:
    return {
        "tasks": report.counts or {n: {} for n in names},
        "discovered": report.discovered,
        "sent_batches": report.sent_batches,
        "reconciled": report.reconciled,
        "timed_out": report.timed_out,
        "interrupted": report.interrupted,
        "seconds": round(report.seconds, 2),
    }


# -- under `fleet beat`: start on the crontab, then tick ---------------------------------


def start(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    holder: str,
) -> dict[str, Any]:
    """Open a beat-driven nightly run, discover, send what backpressure allows.

    Returns a short summary; a run still going is reported, not raised."""
    names = [s.name for s in specs]
    try:
        with transaction(url) as session:
            run_id, took_over = open_run(
                session, names, mode=BEAT, holder=holder, stale_after=beat_stale_after(settings)
            )
    except RunStillGoing as e:
        log.warning("%s", e)
        return {"still_going": e.run.run_id}
    discovered = _discover_all(url, specs, settings)
    with transaction(url) as session:
        _merge(session, run_id, discovered=discovered)
    log.info(
        "nightly run %d opened over %s: %d new items",
        run_id,
        ", ".join(names),
        sum(discovered.values()),
    )
    summary: dict[str, Any] = {"run_id": run_id, "discovered": discovered, "took_over": took_over}
    summary.update(tick(url, app, {s.name: s for s in specs}, settings) or {})
    return summary


def _merge(session: Session, run_id: int, **counts: Any) -> None:
    session.execute(
        update(Run).where(Run.id == run_id).values(counts=Run.counts.op("||")(_jsonb(counts)))
    )


def tick(
    url: str, app: Celery, tasks: dict[str, TaskSpec], settings: Settings
) -> dict[str, Any] | None:
    """Top up the queues of the open beat-driven run; close it when its work is done.

    None when no such run is open (or another tick holds it)."""
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
        counts = _counts(url, [s.name for s in specs])
        now = session.scalar(select(func.now()))
        assert now is not None
        values: dict[str, Any] = {
            "tasks": counts,
            "sent_batches": int(run.counts.get("sent_batches", 0)) + sent,
            "last_tick": now.isoformat(),
        }
        remaining = open_items(counts)
        if remaining == 0:
            values["seconds"] = round((now - run.started_at).total_seconds(), 2)
            values["timed_out"] = False
            _close(session, run.id, **values)
            log.info("nightly run %d finished: %s", run.id, counts)
        else:
            _merge(session, run.id, **values)
        return {"run_id": run.id, "sent_batches": sent, "open_items": remaining}
