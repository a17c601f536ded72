"""The drive loop: discover, feed the queues under backpressure, reconcile on a
timer, count and report progress until every item is finished. `fleet run`
(producer.runner), `fleet nightly` (producer.nightly) and `fleet demo` drive
their runs with `drive`; a beat-driven nightly run (producer.beat) runs one
`feed_pass` per tick. Every one of them feeds through a `Feeder`, so messages
are sized by the workers' measured throughput whoever drives the run.

One pass of `drive`:

    first pass only   discovery (after `fleet sync` of the declared sources, for nightly)
    after an outage   `held()`: does this process still drive the run? (nightly's lock)
    every reconcile_interval   expired leases back to pending, dead past max attempts
    every wake        feed_pass: feed each task the gate lets through (Feeder: batch
                      sizes and queue depths from worker stats)
    every poll        count, say which tasks no live worker serves, progress(counts),
                      stop when nothing is pending, queued or running
    then              wait for a finished-batch signal, at most until the next count

A lost Postgres or Redis connection anywhere in a pass is waited out (Outage);
the timeout stops the run either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from celery import Celery

from config.settings import Settings
from config.taskconfig import TaskSpec
from producer.enqueue import claim_and_send, discover, queue_depth
from producer.outage import Outage
from producer.reconciler import reconcile
from producer.runs import Counts, RunReport, count
from producer.sizing import batch_size_for
from producer.sync import before_discovery
from wire.messages import wait_finished
from wire.stats import redis_client, scan_workers

log = logging.getLogger("fleet.run")

OPEN_STATUSES = ("pending", "queued", "running")


def run_specs(tasks: dict[str, TaskSpec], names: Iterable[str] | None = None) -> list[TaskSpec]:
    """The tasks a run covers: the named ones (all configured if none) plus the
    tasks that follow them (transcribe -> audio_intent). Raises KeyError for an
    unknown name."""
    chosen = [tasks[n] for n in names] if names else list(tasks.values())
    for spec in list(chosen):
        chosen += [tasks[t] for t in spec.then if tasks[t] not in chosen]
    return chosen


def open_items(counts: Counts) -> int:
    """Items pending, queued or running over every task of `counts`."""
    return sum(c.get(s, 0) for c in counts.values() for s in OPEN_STATUSES)


def discover_all(
    url: str, specs: Sequence[TaskSpec], settings: Settings | None = None
) -> dict[str, int]:
    """Discover every task's new items; {task: new items}.

    With `settings`, the declared sources are synced first (FLEET_RERUN_STALE
    included, producer.sync.before_discovery). Follow-up tasks (input_from)
    are left out: the task they follow creates their items; so is the stronger
    task of a cascade run with its cheap task (`escalate_to`): it gets only the
    items the cheap task escalates."""
    if settings is not None:
        before_discovery(settings, specs)
    stronger = {s.escalate_to for s in specs if s.escalate_to}
    return {s.name: discover(url, s) for s in specs if not s.input_from and s.name not in stronger}


def sync_and_discover(
    url: str, specs: Sequence[TaskSpec], settings: Settings | None
) -> tuple[dict[str, Any], dict[str, int]]:
    """({source: what its sync did, or its error}, {task: new items}): with
    `settings`, the declared sources synced first (before_discovery); else no sync."""
    synced = before_discovery(settings, specs) if settings is not None else {}
    return synced, discover_all(url, specs)


class Feeder:
    """Feeds queues on demand, in batches sized by cost (producer/sizing.py).

    `feed` sizes a task's messages from its workers' reported throughput and,
    once measured, keeps about three messages per live worker queued (one
    running, the next ones waiting) instead of FLEET_MAX_INFLIGHT_BATCHES,
    which stays the cap. `wait` blocks until a worker signals a finished batch
    (wire.messages.wait_finished) or the timeout passes, so the driver
    refills a queue the moment it has room rather than on a timer. `close`
    releases its Redis client.
    """

    # How often worker stats are read again, at most. A worker publishes its
    # rate as each batch ends, and the first rates (small messages, a cold
    # start) understate a fast worker: read at once, the sizes climb to about
    # `batch_seconds` within a few messages instead of a second of small ones.
    # A pass costs a SCAN of the worker keys; passes come as batches finish.
    REFRESH_SECONDS = 0.05

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: redis.Redis | None = None
        self._sizes: dict[str, int] = {}
        self._depths: dict[str, int] = {}
        self._read_at = -1e9

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(self.settings.redis_url())
        return self._client

    def _refresh(self) -> None:
        if time.monotonic() - self._read_at < self.REFRESH_SECONDS:
            return
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
        return self._send(
            url,
            app,
            spec,
            batch_size=self.batch_size(spec.name),
            depth=self._depths.get(spec.name, 4 if self.settings.batch_seconds > 0 else None),
        )

    def _send(
        self, url: str, app: Celery, spec: TaskSpec, *, batch_size: int, depth: int | None
    ) -> int:
        """Claim and send batches of `batch_size` items until the queue holds `depth`
        messages (default, and at most, FLEET_MAX_INFLIGHT_BATCHES); returns the
        batches sent. The queue's length is read on this feeder's Redis client."""
        settings = self.settings
        room = min(depth or settings.max_inflight_batches, settings.max_inflight_batches)
        room -= queue_depth(app, spec.queue, client=self._redis())
        if room <= 0:
            return 0
        batches = claim_and_send(
            url,
            app,
            spec,
            limit=room * batch_size,
            batch_size=batch_size,
            lease_seconds=settings.lease_seconds,
        )
        return len(batches)

    def wait(self, timeout: float) -> None:
        """Sleep until a batch finishes somewhere, or `timeout` seconds."""
        if timeout <= 0:
            return
        try:
            wait_finished(self._redis(), timeout)
        except Exception:  # Redis down: the outage handling of the next pass says so
            time.sleep(timeout)

    def close(self) -> None:
        """Close the Redis client, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None


class ServedWatch:
    """Says, a few seconds into a run and then every minute, which tasks with
    waiting items have no live worker, and how to start one.

    Live workers are read from their stats heartbeats in Redis
    (`fleet:worker:<name>`, see wire.stats): a worker appears once its model
    is loaded and disappears a minute after it dies. The run keeps waiting: a
    worker started later picks the work up. `grace` and `repeat` are seconds.
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
        self.echo: Callable[[str], None] = echo or log.warning

    def unserved(self, names: Sequence[str], counts: Counts) -> list[str]:
        """Tasks among `names` with pending or queued items and no live worker.

        Raises the Redis client's errors."""
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

    def check(self, names: Sequence[str], counts: Counts) -> list[str]:
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


def feed_pass(
    feeder: Feeder,
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    gate: Callable[[str], bool] | None = None,
) -> int:
    """One feed pass: every task of `specs` the gate lets through, fed by `feeder`
    (sized messages, backpressure); returns the batches sent. The pass of the
    drive loop (`fleet run`, `fleet nightly`) and of beat's tick (producer.beat)."""
    return sum(feeder.feed(url, app, spec) for spec in gated(specs, gate))


def drive(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    report: RunReport,
    *,
    started: float,
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[Counts], None] | None = None,
    gate: Callable[[str], bool] | None = None,
    sync: bool = False,
    held: Callable[[], bool] | None = None,
) -> None:
    """Drive the run of `report` (its row already open) until nothing of `specs`
    is pending, queued or running, or `timeout` seconds after `started`
    (time.monotonic()). Fills `report` in place: counts, discovered,
    sent_batches, reconciled, timed_out, taken_over.

    `poll`: seconds between counts. `progress(counts)` after each count.
    `gate(task)`, when given, says whether to feed a task (and look for its
    missing workers) on this pass: local workers (fleet.ops.localworkers) hold
    back the tasks whose workers are not up, or whose turn has not come.
    `sync`: sync the declared sources before discovery. `held()`, asked after
    an outage, says whether this process still drives the run; when it does
    not, the loop stops with `report.taken_over` set.

    Lost Postgres or Redis connections are waited out; anything else (and
    KeyboardInterrupt) is raised."""
    names = [s.name for s in specs]
    last_reconcile = time.monotonic()
    outage = Outage()
    watch = ServedWatch(settings.redis_url())
    feeder = Feeder(settings)
    discovered = False
    counted_at = -1e9
    counts: Counts = {}
    try:
        while True:
            # Feed on every wake (a batch finished somewhere); count, report and
            # check for the end once a poll interval: counting scans the ledger.
            try:
                if not discovered:
                    report.sync, report.discovered = sync_and_discover(
                        url, specs, settings if sync else None
                    )
                    discovered = True
                if outage.failures and held is not None and not held():
                    log.error(
                        "run %d was taken over by another driver during the outage; this one stops",
                        report.run_id,
                    )
                    report.taken_over = True
                    return
                if time.monotonic() - last_reconcile >= settings.reconcile_interval:
                    got = reconcile(url, max_attempts=settings.max_attempts)
                    for k, n in got.items():
                        report.reconciled[k] = report.reconciled.get(k, 0) + n
                    last_reconcile = time.monotonic()
                report.sent_batches += feed_pass(feeder, url, app, specs, gate)
                due = time.monotonic() - counted_at >= poll
                if due:
                    counts = count(url, names)
                    counted_at = time.monotonic()
            except Exception as exc:
                delay = outage.failed(exc)  # re-raises anything but a lost connection
                if timeout is not None and time.monotonic() - started + delay > timeout:
                    report.timed_out = True
                    return
                time.sleep(delay)
                continue
            outage.recovered()
            if due:
                watch.check([s.name for s in gated(specs, gate)], counts)
                if progress:
                    progress(counts)
                report.counts = counts
                if open_items(counts) == 0:
                    return
            if timeout is not None and time.monotonic() - started > timeout:
                report.timed_out = True
                return
            feeder.wait(poll - (time.monotonic() - counted_at))
    finally:
        feeder.close()
