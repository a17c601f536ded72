"""A nightly run under `fleet beat`: the crontab entry calls `start`, which
opens the run, discovers and sends what backpressure allows, and returns;
`tick`, every beat_feed_seconds, tops the queues up and closes the run once
nothing is pending, queued or running. No scheduled task blocks for hours.

A tick is one feed pass of producer.drive (`feed_pass`, the same sized
Feeder as `fleet run` and `fleet nightly`), so a nightly run sends messages
of the same sizes whichever process drives it. One run at a time:
producer.runlock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from config.settings import Settings
from config.taskconfig import TaskSpec
from db import ledger
from db.engine import transaction
from db.schema import Run
from producer import runs
from producer.drive import Feeder, discover_all, feed_pass, open_items
from producer.runlock import BEAT, TRIGGER, RunStillGoing, beat_stale_after, open_run
from producer.runs import count
from producer.sync import before_discovery

log = logging.getLogger("fleet.nightly")


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
        feeder = Feeder(settings)
        try:
            sent = feed_pass(feeder, url, app, specs)
        finally:
            feeder.close()
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
