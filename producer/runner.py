"""Drive tasks to completion: discover, feed the queues under backpressure,
reconcile on a timer, and report progress. Used by `fleet run`, the nightly
schedule and `fleet demo`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import func, update

from db import ledger
from db.engine import transaction
from db.schema import Run
from fleet.config.settings import Settings
from fleet.config.taskconfig import TaskSpec
from producer.enqueue import claim_and_send, discover, queue_depth
from producer.reconciler import reconcile
from producer.sizing import batch_size_for
from workers.messages import wait_finished
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


def feed(
    url: str,
    app: Celery,
    spec: TaskSpec,
    settings: Settings,
    *,
    batch_size: int | None = None,
    depth: int | None = None,
) -> int:
    """Claim and send batches of `batch_size` (default FLEET_BATCH_SIZE) until the
    queue holds `depth` messages (default FLEET_MAX_INFLIGHT_BATCHES)."""
    size = batch_size or settings.batch_size
    room = min(depth or settings.max_inflight_batches, settings.max_inflight_batches)
    room -= queue_depth(app, spec.queue)
    if room <= 0:
        return 0
    batches = claim_and_send(
        url,
        app,
        spec,
        limit=room * size,
        batch_size=size,
        lease_seconds=settings.lease_seconds,
    )
    return len(batches)


class Feeder:
    """Feeds queues on demand, in batches sized by cost (producer/sizing.py).

    `feed` sizes a task's messages from its workers' reported throughput and,
    once measured, keeps about three messages per live worker queued (one
    running, the next ones waiting) instead of FLEET_MAX_INFLIGHT_BATCHES,
    which stays the cap. `wait` blocks until a worker signals a finished batch
    (workers.messages.wait_finished) or the timeout passes, so the driver
    refills a queue the moment it has room rather than on a timer.
    """

    REFRESH_SECONDS = 1.0  # how often worker stats are read again

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._sizes: dict[str, int] = {}
        self._depths: dict[str, int] = {}
        self._read_at = -1e9

    def _redis(self) -> Any:
        if self._client is None:
            from workers.stats import redis_client

            self._client = redis_client(self.settings.redis_url())
        return self._client

    def _refresh(self) -> None:
        if time.monotonic() - self._read_at < self.REFRESH_SECONDS:
            return
        from workers.stats import scan_workers

        self._read_at = time.monotonic()
        rates: dict[str, list[float]] = {}
        for w in scan_workers(self._redis()):
            rates.setdefault(w.task, []).append(w.recent_items_per_s)
        s = self.settings
        self._sizes = {
            task: batch_size_for(
                r,
                base=s.batch_size,
                cap=s.max_batch_size,
                target_seconds=s.batch_seconds,
                lease_seconds=s.lease_seconds,
            )
            for task, r in rates.items()
        }
        # Sized batches need few in the queue: ~3 per live worker (one running,
        # the next waiting, one spare), so a task's backlog is not cut into
        # small first batches before any throughput is measured.
        self._depths = (
            {task: max(4, 3 * len(r)) for task, r in rates.items()} if s.batch_seconds > 0 else {}
        )

    def batch_size(self, task: str) -> int:
        """Items per message for `task` now."""
        return self._sizes.get(task, self.settings.batch_size)

    def feed(self, url: str, app: Celery, spec: TaskSpec) -> int:
        """One feed pass for one task; returns the batches sent."""
        try:
            self._refresh()
        except Exception as e:  # Redis blip: keep the last sizes
            log.debug("worker stats not readable for batch sizing: %s", e)
        return feed(
            url,
            app,
            spec,
            self.settings,
            batch_size=self.batch_size(spec.name),
            depth=self._depths.get(spec.name, 4 if self.settings.batch_seconds > 0 else None),
        )

    def wait(self, timeout: float) -> None:
        """Sleep until a batch finishes somewhere, or `timeout` seconds."""
        if timeout <= 0:
            return
        try:
            wait_finished(self._redis(), timeout)
        except Exception:  # Redis down: the outage handling of the next pass says so
            time.sleep(timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


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


TASK_COLUMN = 64  # runs.task is varchar(64)


def task_label(names: Sequence[str]) -> str:
    """What fits the runs.task column: the names joined by commas, or "N tasks"
    when they do not fit (the full list is in the run's counts, `task_names`)."""
    label = ",".join(names)
    if len(label) <= TASK_COLUMN:
        return label
    return f"{len(names)} tasks"


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
    missing workers) on this pass: local workers (fleet.ops.localworkers) hold back
    the tasks whose workers are not up, or whose turn has not come."""
    started = time.monotonic()
    names = [s.name for s in specs]
    with transaction(url) as session:
        run = Run(trigger=trigger, task=task_label(names))
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
    feeder = Feeder(settings)
    counted_at = -1e9
    while True:
        # Feed on every wake (a batch finished somewhere); count, report and
        # check for the end once a poll interval: counting scans the ledger.
        try:
            if time.monotonic() - last_reconcile >= settings.reconcile_interval:
                got = reconcile(url, max_attempts=settings.max_attempts)
                for k in got:
                    report.reconciled[k] += got[k]
                last_reconcile = time.monotonic()
            for spec in gated(specs, gate):
                report.sent_batches += feeder.feed(url, app, spec)
            due = time.monotonic() - counted_at >= poll
            if due:
                with transaction(url) as session:
                    counts = {n: ledger.counts(session, task=n).get(n, {}) for n in names}
                counted_at = time.monotonic()
        except Exception as exc:
            delay = outage.failed(exc)  # re-raises anything but a lost connection
            if timeout is not None and time.monotonic() - started + delay > timeout:
                report.timed_out = True
                break
            time.sleep(delay)
            continue
        outage.recovered()
        if due:
            watch.check([s.name for s in gated(specs, gate)], counts)
            if progress:
                progress(counts)
            report.counts = counts
            if _finished(specs, counts):
                break
        if timeout is not None and time.monotonic() - started > timeout:
            report.timed_out = True
            break
        feeder.wait(poll - (time.monotonic() - counted_at))
    feeder.close()
    report.seconds = time.monotonic() - started
    _close_with_retries(url, run_id, report, outage)
    return report


def _close_with_retries(url: str, run_id: int, report: RunReport, outage: Outage) -> None:
    for _ in range(10):  # Postgres may be restarting right now: the record is worth a wait
        try:
            _close_run(url, run_id, report)
            return
        except Exception as exc:
            time.sleep(outage.failed(exc))
    log.error("run %d finished but its end could not be recorded in the runs table", run_id)


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
                counts={
                    "tasks": report.counts,
                    "task_names": list(report.counts),
                    "timed_out": report.timed_out,
                },
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
