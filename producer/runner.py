"""Drive tasks to completion: discover, feed the queues under backpressure,
reconcile on a timer, and report progress. Used by `fleet run`, the nightly
schedule and `fleet demo`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import func, update

from db import ledger
from db.engine import transaction
from db.schema import Run
from fleet.settings import Settings
from fleet.taskconfig import TaskSpec
from producer.enqueue import claim_and_send, discover, queue_depth
from producer.reconciler import reconcile


@dataclass
class RunReport:
    run_id: int
    counts: dict[str, dict[str, int]]
    seconds: float
    timed_out: bool = False
    sent_batches: int = 0
    reconciled: dict[str, int] = field(default_factory=lambda: {"returned": 0, "dead": 0})


def feed(url: str, app: Celery, spec: TaskSpec, settings: Settings) -> int:
    """Claim and send batches until the queue holds max_inflight_batches."""
    room = settings.max_inflight_batches - queue_depth(app, spec.queue)
    if room <= 0:
        return 0
    batches = claim_and_send(
        url,
        app,
        spec,
        limit=room * settings.batch_size,
        batch_size=settings.batch_size,
        lease_seconds=settings.lease_seconds,
    )
    return len(batches)


def run_until_done(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    trigger: str = "manual",
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
) -> RunReport:
    started = time.monotonic()
    names = [s.name for s in specs]
    with transaction(url) as session:
        run = Run(trigger=trigger, task=",".join(names))
        session.add(run)
        session.flush()
        run_id = run.id
    for spec in specs:
        if not spec.input_from:  # follow-up tasks are created by the task they follow
            discover(url, spec)
    report = RunReport(run_id, {}, 0.0)
    last_reconcile = time.monotonic()
    while True:
        if time.monotonic() - last_reconcile >= settings.reconcile_interval:
            got = reconcile(url, max_attempts=settings.max_attempts)
            for k in got:
                report.reconciled[k] += got[k]
            last_reconcile = time.monotonic()
        for spec in specs:
            report.sent_batches += feed(url, app, spec, settings)
        with transaction(url) as session:
            counts = {n: ledger.counts(session, task=n).get(n, {}) for n in names}
        if progress:
            progress(counts)
        report.counts = counts
        open_items = sum(
            c.get(s, 0) for c in counts.values() for s in ("pending", "queued", "running")
        )
        upstream_open = any(
            sum(counts[s.name].get(k, 0) for k in ("pending", "queued", "running"))
            for s in specs
            if s.then
        )
        if open_items == 0 and not upstream_open:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            report.timed_out = True
            break
        time.sleep(poll)
    report.seconds = time.monotonic() - started
    with transaction(url) as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(
                finished_at=func.now(),
                counts={"tasks": report.counts, "timed_out": report.timed_out},
            )
        )
    return report
