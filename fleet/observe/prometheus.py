"""`fleet metrics`: a Prometheus exporter for what Flower does not show.

Every scrape reads the fleet's state once (`fleet.observe.status.collect`, the same
read `fleet status` prints) and turns it into metric families: the backlog by
task and status and each queue's length (what an autoscaler such as KEDA's
Prometheus scaler needs), throughput and ETA, and each live worker's counters,
batch-seconds histogram, model tier and GPU memory (published by the workers
to Redis, see `wire.stats`). An unreadable Postgres or Redis shows as
`fleet_exporter_up{source=...} 0` rather than a failed scrape.

A scrape stays within Prometheus' timeout while a migration or VACUUM FULL
holds `work_items`: the ledger read is bounded (`status.read_ledger`: lock and
statement timeouts), only one scrape reads the ledger at a time (another waits
at most LEDGER_WAIT_S, then answers without reading, so backends cannot pile
up), and a scrape whose read failed shows the last good ledger figures with
`fleet_exporter_ledger_age_seconds` saying how old they are.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from fleet.observe.status import (
    STATEMENT_TIMEOUT_S,
    FleetStatus,
    LedgerRead,
    collect,
    read_ledger,
)
from wire import keys
from wire.stats import BATCH_BUCKETS, OUTCOMES, WorkerStats, redis_client

log = logging.getLogger("fleet.observe.prometheus")

SOURCES = ("database", "broker")
LEDGER_WAIT_S = STATEMENT_TIMEOUT_S  # how long a scrape waits for another's ledger read


class LedgerBusy(RuntimeError):
    """Another scrape is still reading the ledger."""


class ListenError(RuntimeError):
    pass


WORKER_LABELS = ["worker", "task"]


def _worker_counters(workers: Sequence[WorkerStats]) -> list[Metric]:
    items = CounterMetricFamily(
        "fleet_worker_items",
        "Items a worker finished, by outcome (done, failed, dead).",
        labels=[*WORKER_LABELS, "outcome"],
    )
    messages = CounterMetricFamily(
        "fleet_worker_messages",
        "Batch messages a worker took, by outcome: processed (ran through the model), stale "
        "(nothing left leased to it), split (poison isolation), poison (marked dead).",
        labels=[*WORKER_LABELS, "outcome"],
    )
    simple: list[tuple[CounterMetricFamily, Callable[[WorkerStats], int]]] = [
        (
            CounterMetricFamily(
                "fleet_worker_ooms", "Out-of-memory errors caught.", labels=WORKER_LABELS
            ),
            lambda w: w.ooms,
        ),
        (
            CounterMetricFamily(
                "fleet_worker_downshifts",
                "Steps down the model ladder after an OOM.",
                labels=WORKER_LABELS,
            ),
            lambda w: w.downshifts,
        ),
        (
            CounterMetricFamily(
                "fleet_worker_step_ups",
                "Steps back up the ladder after clean batches.",
                labels=WORKER_LABELS,
            ),
            lambda w: w.step_ups,
        ),
    ]
    for w in workers:
        labels = [w.worker, w.task]
        items.add_metric([*labels, "done"], w.items_done)
        items.add_metric([*labels, "failed"], w.items_failed)
        items.add_metric([*labels, "dead"], w.items_dead)
        for outcome in sorted({*OUTCOMES, *w.messages}):
            messages.add_metric([*labels, outcome], w.messages.get(outcome, 0))
        for family, value in simple:
            family.add_metric(labels, value(w))
    return [items, messages, *(f for f, _ in simple)]


def _worker_gauges(st: FleetStatus) -> list[Metric]:
    hist = HistogramMetricFamily(
        "fleet_worker_batch_seconds",
        "Seconds per batch in the worker, from start_batch to committed results.",
        labels=WORKER_LABELS,
    )
    tier = GaugeMetricFamily(
        "fleet_worker_tier",
        "Model ladder tier the worker holds now (0 = largest).",
        labels=WORKER_LABELS,
    )
    info = GaugeMetricFamily(
        "fleet_worker_info",
        "Always 1; labels name the worker's model, GPU and device.",
        labels=[*WORKER_LABELS, "model", "gpu", "device", "device_name"],
    )
    allocated = GaugeMetricFamily(
        "fleet_worker_gpu_memory_allocated_bytes",
        "GPU memory held by tensors (torch.cuda.memory_allocated); 0 on CPU.",
        labels=WORKER_LABELS,
    )
    reserved = GaugeMetricFamily(
        "fleet_worker_gpu_memory_reserved_bytes",
        "GPU memory reserved by the caching allocator; 0 on CPU.",
        labels=WORKER_LABELS,
    )
    total = GaugeMetricFamily(
        "fleet_worker_gpu_memory_total_bytes", "The GPU's memory; 0 on CPU.", labels=WORKER_LABELS
    )
    seen = GaugeMetricFamily(
        "fleet_worker_last_seen_seconds",
        "Seconds since the worker last published its stats (batch or heartbeat).",
        labels=WORKER_LABELS,
    )
    for w in st.workers:
        labels = [w.worker, w.task]
        buckets = [
            *(
                (floatToGoString(bound), n)
                for bound, n in zip(BATCH_BUCKETS, w.batch_seconds_buckets[:-1], strict=True)
            ),
            ("+Inf", w.batch_seconds_buckets[-1]),
        ]
        hist.add_metric(labels, buckets, w.batch_seconds_sum)
        tier.add_metric(labels, w.tier)
        info.add_metric([*labels, w.model, w.gpu, w.device, w.device_name], 1)
        allocated.add_metric(labels, w.gpu_memory_allocated)
        reserved.add_metric(labels, w.gpu_memory_reserved)
        total.add_metric(labels, w.gpu_memory_total)
        seen.add_metric(labels, st.last_seen(w))
    return [hist, tier, info, allocated, reserved, total, seen]


def _task_gauges(st: FleetStatus) -> list[Metric]:
    backlog = GaugeMetricFamily(
        "fleet_backlog_items",
        "Work items in the ledger by task and status.",
        labels=["task", "status"],
    )
    remaining = GaugeMetricFamily(
        "fleet_remaining_items",
        "Work items not finished yet (pending + queued + running).",
        labels=["task"],
    )
    queue = GaugeMetricFamily(
        "fleet_queue_length",
        "Batch messages waiting in the task's Redis queue (all priorities).",
        labels=["task", "queue"],
    )
    rate = GaugeMetricFamily(
        "fleet_items_per_second",
        f"Results written per second over the last {st.window_seconds:g} s.",
        labels=["task"],
    )
    eta = GaugeMetricFamily(
        "fleet_eta_seconds",
        "Remaining items / items per second (absent while nothing is finishing).",
        labels=["task"],
    )
    workers = GaugeMetricFamily("fleet_workers", "Live workers serving the task.", labels=["task"])
    for name, t in st.tasks.items():
        if st.ledger_read_at is not None:  # this read's, or the last good one's
            for status, n in t.counts.items():
                backlog.add_metric([name, status], n)
            remaining.add_metric([name], t.remaining)
        if t.queue_length is not None:
            queue.add_metric([name, keys.task_queue(name)], t.queue_length)
        if t.items_per_second is not None:
            rate.add_metric([name], t.items_per_second)
        if t.eta_seconds is not None:
            eta.add_metric([name], t.eta_seconds)
        if "broker" not in st.errors:
            workers.add_metric([name], t.workers)
    return [backlog, remaining, queue, rate, eta, workers]


def _run_gauges(st: FleetStatus) -> list[Metric]:
    started = GaugeMetricFamily(
        "fleet_last_run_started_timestamp_seconds",
        "When the newest run (fleet run / nightly) started.",
        labels=["trigger"],
    )
    finished = GaugeMetricFamily(
        "fleet_last_run_finished_timestamp_seconds",
        "When the newest run finished (absent while it is still going).",
        labels=["trigger"],
    )
    unacked = GaugeMetricFamily(
        "fleet_broker_unacked_messages",
        "Messages delivered to a worker and not acknowledged yet (batches running).",
    )
    run = st.latest_run
    if run is not None:
        started.add_metric([run.trigger], run.started_at.timestamp())
        if run.finished_at is not None:
            finished.add_metric([run.trigger], run.finished_at.timestamp())
    if st.unacked is not None:
        unacked.add_metric([], st.unacked)
    return [started, finished, unacked]


def _source_gauges(st: FleetStatus) -> list[Metric]:
    lag = GaugeMetricFamily(
        "fleet_source_lag_seconds",
        "Seconds since the source's last successful fleet sync.",
        labels=["source"],
    )
    problems = GaugeMetricFamily(
        "fleet_source_problem_rows",
        "Source rows the sync refused or took with a note (sync_problems).",
        labels=["source", "kind"],
    )
    waiting = GaugeMetricFamily(
        "fleet_source_undiscovered_rows",
        "Rows synced from the source that no task has a work item for yet.",
        labels=["source"],
    )
    withheld = GaugeMetricFamily(
        "fleet_source_withheld_deletes",
        "Rows gone from the source that the mass-delete guard did not mark gone.",
        labels=["source"],
    )
    failing = GaugeMetricFamily(
        "fleet_source_failing", "1 if the source's last sync failed as a whole.", labels=["source"]
    )
    for name, src in st.sources.items():
        if src.lag_seconds is not None:
            lag.add_metric([name], src.lag_seconds)
        problems.add_metric([name, "refused"], src.refused)
        problems.add_metric([name, "noted"], src.noted)
        waiting.add_metric([name], src.undiscovered)
        withheld.add_metric([name], src.withheld)
        failing.add_metric([name], 1 if src.last_error else 0)
    return [lag, problems, waiting, withheld, failing]


def _cascade_gauges(st: FleetStatus) -> list[Metric]:
    escalated = GaugeMetricFamily(
        "fleet_cascade_escalated_items",
        "Items the cheap task of a cascade sent to its stronger task (escalate_below).",
        labels=["task", "escalate_to"],
    )
    share = GaugeMetricFamily(
        "fleet_cascade_escalation_share",
        "Escalated items / items the cheap task answered (0-1).",
        labels=["task", "escalate_to"],
    )
    state = GaugeMetricFamily(
        "fleet_cascade_strong_items",
        "Escalated items by their state on the stronger task (answered, waiting, failed).",
        labels=["task", "escalate_to", "state"],
    )
    cost = GaugeMetricFamily(
        "fleet_cascade_strong_model_seconds",
        "The stronger tier's model time over the items it answered (sum of per-item latency).",
        labels=["task", "escalate_to"],
    )
    for name, c in st.cascades.items():
        key = [name, c.strong]
        escalated.add_metric(key, c.escalated)
        if c.share is not None:
            share.add_metric(key, c.share)
        for label, n in (("answered", c.answered), ("waiting", c.waiting), ("failed", c.failed)):
            state.add_metric([*key, label], n)
        if c.strong_model_seconds is not None:
            cost.add_metric(key, c.strong_model_seconds)
    return [escalated, share, state, cost]


def metric_families(st: FleetStatus) -> list[Metric]:
    """Every `fleet_*` metric family for one status read."""
    up = GaugeMetricFamily(
        "fleet_exporter_up",
        "1 if the source (database, broker) could be read on this scrape.",
        labels=["source"],
    )
    for source in SOURCES:
        up.add_metric([source], 0 if source in st.errors else 1)
    age = GaugeMetricFamily(
        "fleet_exporter_ledger_age_seconds",
        "Seconds since the ledger figures shown were read: 0 when this scrape read them, "
        "more while the database is unreadable and the last good figures are shown.",
    )
    if st.ledger_age is not None:
        age.add_metric([], st.ledger_age)
    return [
        up,
        age,
        *_task_gauges(st),
        *_run_gauges(st),
        *_source_gauges(st),
        *_cascade_gauges(st),
        *_worker_counters(st.workers),
        *_worker_gauges(st),
    ]


class FleetCollector(Collector):
    """Reads the fleet on every scrape."""

    def __init__(
        self,
        db_url: str,
        broker_url: str,
        *,
        tasks: Sequence[str],
        window: float,
        cascades: Mapping[str, str] | None = None,
    ) -> None:
        self.db_url = db_url
        self.cascades = dict(cascades or {})
        self.broker_url = broker_url
        self.client = redis_client(broker_url)
        self.tasks = list(tasks)
        self.window = window
        self._reading = threading.Lock()  # one ledger read at a time
        self._last: LedgerRead | None = None  # the last good one

    def _read_ledger(self, url: str, only: str | None, window: float) -> LedgerRead:
        if not self._reading.acquire(timeout=LEDGER_WAIT_S):
            raise LedgerBusy(
                f"a ledger read of an earlier scrape has not finished in {LEDGER_WAIT_S:g} s"
            )
        try:
            got = read_ledger(url, only, window)
            self._last = got
            return got
        finally:
            self._reading.release()

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        st = collect(
            self.db_url,
            self.client,
            tasks=self.tasks,
            window=self.window,
            broker_url=self.broker_url,
            ledger_reader=self._read_ledger,
            last_ledger=self._last,
            cascades=self.cascades,
        )
        for source, error in st.errors.items():
            log.warning("scrape: %s unreadable: %s", source, error)
        yield from metric_families(st)
        duration = GaugeMetricFamily(
            "fleet_exporter_scrape_seconds", "Seconds this scrape spent reading the fleet."
        )
        duration.add_metric([], time.perf_counter() - started)
        yield duration


def serve(
    db_url: str,
    broker_url: str,
    *,
    address: str,
    port: int,
    tasks: Sequence[str],
    window: float,
    ready: Callable[[str], Any] | None = None,
    cascades: Mapping[str, str] | None = None,
) -> None:
    """Serve /metrics until SIGTERM or Ctrl-C. `cascades`: {cheap task: stronger task}."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(db_url, broker_url, tasks=tasks, window=window, cascades=cascades)
    )
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as e:
        raise ListenError(
            f"cannot listen on {address}:{port} ({e.strerror or e}): choose another with "
            "--port / FLEET_METRICS_PORT, or --address / FLEET_METRICS_ADDRESS"
        ) from e
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    host = f"[{address}]" if ":" in address else address
    if ready is not None:
        ready(f"serving Prometheus metrics on http://{host}:{server.server_port}/metrics")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_exporter(
    settings: Any, *, address: str | None, port: int | None, echo: Callable[[str], Any]
) -> int:
    """`fleet metrics`: serve until stopped. Returns the exit code."""
    from fleet.observe.cascade import configured_cascades
    from fleet.observe.status import RATE_WINDOW_S, configured_tasks

    address = address or settings.metrics_address
    port = settings.metrics_port if port is None else port
    try:
        serve(
            settings.db_url(),
            settings.redis_url(),
            address=address,
            port=port,
            tasks=configured_tasks(settings.config_file),
            window=RATE_WINDOW_S,
            ready=echo,
            cascades=configured_cascades(settings.config_file),
        )
    except ListenError as e:
        echo(str(e))
        return 2
    return 0
