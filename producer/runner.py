"""Drive tasks to completion: discover, feed the queues under backpressure,
reconcile on a timer, and report progress. Used by `fleet run`, the nightly
schedule and `fleet demo`."""

from __future__ import annotations

import logging
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
from workers.policy import backoff, transient_service

log = logging.getLogger("fleet.run")


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


class ServedWatch:
    """Says, a few seconds into a run and then every minute, which tasks with
    waiting items have no live worker, and how to start one.

    Live workers are read from their stats heartbeats in Redis
    (`fleet:worker:<name>`, see workers.stats): a worker appears once its model
    is loaded and disappears a minute after it dies. The run keeps waiting: a
    worker started later picks the work up.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        grace: float = 5.0,
        repeat: float = 60.0,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.grace, self.repeat = grace, repeat
        self.started = time.monotonic()
        self.last_said: dict[str, float] = {}
        self.echo = echo or log.warning

    def unserved(self, names: Sequence[str], counts: dict[str, dict[str, int]]) -> list[str]:
        """Tasks among `names` with pending or queued items and no live worker."""
        from workers.stats import redis_client, scan_workers

        waiting = [
            n
            for n in names
            if counts.get(n, {}).get("pending", 0) + counts.get(n, {}).get("queued", 0)
        ]
        if not waiting:
            return []
        client = redis_client(self.broker_url)
        try:
            served = {w.task for w in scan_workers(client)}
        finally:
            client.close()
        return [n for n in waiting if n not in served]

    def check(self, names: Sequence[str], counts: dict[str, dict[str, int]]) -> list[str]:
        """Say which tasks nobody serves (at most once a `repeat` per task); return them."""
        now = time.monotonic()
        if now - self.started < self.grace:
            return []
        try:
            missing = self.unserved(names, counts)
        except Exception as e:  # a Redis blip: the drive loop's outage handling owns that
            log.debug("worker heartbeat check skipped: %s", e)
            return []
        for name in missing:
            if now - self.last_said.get(name, -1e9) >= self.repeat:
                self.last_said[name] = now
                waiting = counts.get(name, {})
                n = waiting.get("pending", 0) + waiting.get("queued", 0)
                self.echo(
                    f"no live worker serves task {name!r} ({n} item(s) waiting; no worker "
                    f"for it has reported a heartbeat): start one with `fleet worker --task "
                    f"{name}` (or `fleet workers --task {name} --gpus all`); still waiting"
                )
        return missing


def gated(specs: Sequence[TaskSpec], gate: Callable[[str], bool] | None) -> list[TaskSpec]:
    """The tasks to feed on this pass: all of them, or those the gate lets through."""
    return list(specs) if gate is None else [s for s in specs if gate(s.name)]


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
    gate: Callable[[str], bool] | None = None,
) -> RunReport:
    """Discover, then feed and reconcile until every task's items are finished.

    `gate(task)`, when given, says whether to feed a task (and look for its
    missing workers) on this pass: local workers (fleet.localworkers) hold back
    the tasks whose workers are not up, or whose turn has not come."""
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
    outage = Outage()
    watch = ServedWatch(settings.redis_url())
    while True:
        try:
            if time.monotonic() - last_reconcile >= settings.reconcile_interval:
                got = reconcile(url, max_attempts=settings.max_attempts)
                for k in got:
                    report.reconciled[k] += got[k]
                last_reconcile = time.monotonic()
            for spec in gated(specs, gate):
                report.sent_batches += feed(url, app, spec, settings)
            with transaction(url) as session:
                counts = {n: ledger.counts(session, task=n).get(n, {}) for n in names}
        except Exception as exc:
            delay = outage.failed(exc)  # re-raises anything but a lost connection
            if timeout is not None and time.monotonic() - started + delay > timeout:
                report.timed_out = True
                break
            time.sleep(delay)
            continue
        outage.recovered()
        watch.check([s.name for s in gated(specs, gate)], counts)
        if progress:
            progress(counts)
        report.counts = counts
        if _finished(specs, counts):
            break
        if timeout is not None and time.monotonic() - started > timeout:
            report.timed_out = True
            break
        time.sleep(poll)
    report.seconds = time.monotonic() - started
    for _ in range(10):  # Postgres may be restarting right now: the record is worth a wait
        try:
            _close_run(url, run_id, report)
            break
        except Exception as exc:
            time.sleep(outage.failed(exc))
    else:
        log.error("run %d finished but its end could not be recorded in the runs table", run_id)
    return report


def _finished(specs: Sequence[TaskSpec], counts: dict[str, dict[str, int]]) -> bool:
    open_items = sum(c.get(s, 0) for c in counts.values() for s in ("pending", "queued", "running"))
    upstream_open = any(
        sum(counts[s.name].get(k, 0) for k in ("pending", "queued", "running"))
        for s in specs
        if s.then
    )
    return open_items == 0 and not upstream_open


def _close_run(url: str, run_id: int, report: RunReport) -> None:
    with transaction(url) as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(
                finished_at=func.now(),
                counts={"tasks": report.counts, "timed_out": report.timed_out},
            )
        )


class Outage:
    """Rides out Postgres or Redis going away during a run.

    The ledger keeps every item safe while a service is down (leases expire,
    the reconciler returns them), so the run waits with capped exponential
    backoff and says so, instead of dying with a traceback. Errors that are not
    a lost connection are raised again.
    """

    def __init__(self, *, base: float = 0.5, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self.since = 0.0
        self.service = ""

    def failed(self, exc: BaseException) -> float:
        """Log the outage and return how long to wait before the next try."""
        service = transient_service(exc)
        if service is None:
            raise exc
        if self.failures == 0:
            self.since = time.monotonic()
        self.failures += 1
        self.service = service
        delay = backoff(self.failures - 1, base=self.base, cap=self.cap, jitter=False)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning(
            "%s unreachable (%s: %s); retrying in %.1fs (try %d, down %.0fs). "
            "Items stay safe in the ledger; check that %s is running.",
            service,
            type(exc).__name__,
            detail[:300],
            delay,
            self.failures,
            time.monotonic() - self.since,
            service,
        )
        return delay

    def recovered(self) -> None:
        if self.failures:
            log.warning(
                "%s reachable again after %.0fs and %d failed tries; the run goes on",
                self.service,
                time.monotonic() - self.since,
                self.failures,
            )
            self.failures = 0
