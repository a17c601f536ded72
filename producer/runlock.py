"""One nightly run at a time, whoever drives it.

Opening a run takes a transaction advisory lock, so two starters never both
pass the check, then looks for an open nightly row:

    open row, its driver alive    -> RunStillGoing (nothing started)
    open row, its driver gone     -> closed as abandoned, a new run starts
      foreground: its session lock is free (the process died)
      beat: no tick for `beat_stale_after` seconds (no control worker)

A foreground driver (`fleet nightly`, producer.nightly) holds a session lock
on its run (RunLock) for as long as it lives; a beat-driven run (producer.beat)
stamps `last_tick` on every tick instead.

The ledger, not the run row, knows what is unfinished: a run closed as
abandoned or timed out leaves its items pending/queued, and the next run or
the reconciler picks them up.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from config.settings import Settings
from db.engine import get_engine
from db.schema import Run
from producer import runs

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


class RunLock:
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
