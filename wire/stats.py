"""Live worker stats, published to Redis for `fleet status`, `fleet watch` and
`fleet metrics`.

Each worker keeps a few counters and a histogram of batch seconds in memory and
writes them, as one JSON value, to `fleet:worker:<celery hostname>` with a TTL:
after every batch (one SET) and from a heartbeat thread every few seconds, so a
worker inside a long batch stays visible and a killed one disappears when its
key expires. Readers never need the worker to answer (unlike `celery inspect`).

No torch import at module level: the CLI and the exporter read these values
with `decode` and `scan_workers`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from wire import keys

log = logging.getLogger("fleet.stats")

TTL_SECONDS = 60
HEARTBEAT_SECONDS = 10.0
# Upper bounds (seconds) of the batch-seconds histogram; a final +Inf bucket follows.
BATCH_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Message outcomes besides a batch run through the model.
OUTCOMES = ("processed", "stale", "split", "poison", "duplicate")


def redis_client(url: str) -> redis.Redis:
    """A client for the broker URL, including the embedded server's
    `redis+socket:///path` form (kombu's spelling of a unix socket)."""
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def worker_key(hostname: str) -> str:
    """The Redis key of a worker's published stats (wire.keys.worker)."""
    return keys.worker(hostname)


def gpu_slot() -> str:
    """The physical GPU this process is pinned to (CUDA_VISIBLE_DEVICES), or 'cpu'."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or "cpu"


@dataclass
class WorkerStats:
    """What one worker reports. Counters only grow during the process's life."""

    worker: str
    task: str
    pid: int
    gpu: str
    device: str
    device_name: str
    started_at: float
    tier: int = -1
    model: str = ""
    batches: int = 0
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    items_done: int = 0
    items_failed: int = 0
    items_dead: int = 0
    ooms: int = 0
    downshifts: int = 0
    step_ups: int = 0
    # Cumulative counts per BATCH_BUCKETS bound, then +Inf (Prometheus histogram layout).
    batch_seconds_buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    batch_seconds_sum: float = 0.0
    last_batch_at: float | None = None
    # Items per second of worker time over recent batches (an exponentially
    # weighted mean, half weight on the newest batch): what `fleet run` sizes
    # the next batches by (producer/sizing.py).
    recent_items_per_s: float = 0.0
    gpu_memory_allocated: int = 0
    gpu_memory_reserved: int = 0
    gpu_memory_total: int = 0
    updated_at: float = 0.0

    def observe_batch(
        self,
        *,
        seconds: float,
        done: int,
        failed: int,
        ooms: int,
        downshifts: int,
        step_ups: int,
    ) -> None:
        self.batches += 1
        self.messages["processed"] += 1
        self.items_done += done
        self.items_failed += failed
        self.ooms += ooms
        self.downshifts += downshifts
        self.step_ups += step_ups
        for i, bound in enumerate(BATCH_BUCKETS):
            if seconds <= bound:
                self.batch_seconds_buckets[i] += 1
        self.batch_seconds_buckets[-1] += 1
        self.batch_seconds_sum += seconds
        self.last_batch_at = time.time()
        if seconds > 0 and done + failed > 0:
            rate = (done + failed) / seconds
            old = self.recent_items_per_s
            self.recent_items_per_s = rate if old <= 0 else 0.5 * old + 0.5 * rate

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def decode(raw: bytes | str) -> WorkerStats:
    """A published value back into WorkerStats; unknown keys (a newer worker) are ignored."""
    data: dict[str, Any] = json.loads(raw)
    known = set(WorkerStats.__dataclass_fields__)
    stats = WorkerStats(**{k: v for k, v in data.items() if k in known})
    if len(stats.batch_seconds_buckets) != len(BATCH_BUCKETS) + 1:
        raise ValueError(f"worker {stats.worker}: histogram has other buckets than this reader")
    return stats


def scan_workers(client: redis.Redis) -> list[WorkerStats]:
    """Every live worker's stats (keys not yet expired), sorted by task and name."""
    found = sorted(client.scan_iter(match=keys.WORKER_PREFIX + "*", count=500))
    if not found:
        return []
    out = []
    for key, raw in zip(found, client.mget(found), strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            out.append(decode(raw))
        except (ValueError, TypeError) as e:
            log.warning("ignoring unreadable worker stats under %r: %s", key, e)
    return sorted(out, key=lambda s: (s.task, s.worker))


class Publisher:
    """Owns one worker's stats and writes them to Redis; never lets a Redis
    problem reach the batch (a failed write is logged once and retried on the
    next batch or heartbeat)."""

    def __init__(
        self,
        client: redis.Redis,
        stats: WorkerStats,
        *,
        placement: Callable[[], tuple[int, str]],
        memory: Callable[[], tuple[int, int, int]],
        ttl: int = TTL_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.client = client
        self.stats = stats
        self.placement = placement  # () -> (tier, model name), read at each write
        self.memory = memory  # () -> (allocated, reserved, total) bytes
        self.ttl = ttl
        self.heartbeat = heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._beat, name="fleet-stats", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.heartbeat)
            self._wake.clear()
            if not self._stop.is_set():
                self.publish()

    def record(self, update: Callable[[WorkerStats], None]) -> None:
        """Apply an update now; it is written to Redis by the stats thread right
        after (off the batch's path: the batch never waits for Redis here)."""
        with self._lock:
            update(self.stats)
        if self._thread is None:
            self.publish()
        else:
            self._wake.set()

    def publish(self) -> None:
        with self._lock:
            s = self.stats
            try:
                s.tier, s.model = self.placement()
                s.gpu_memory_allocated, s.gpu_memory_reserved, s.gpu_memory_total = self.memory()
            except Exception as e:  # a tier switch in progress: keep the last values
                log.debug("stats: placement/memory not readable now: %s", e)
            s.updated_at = time.time()
            value = s.encode()
        try:
            self.client.set(worker_key(s.worker), value, ex=self.ttl)
        except (redis.RedisError, OSError) as e:
            if not self._failing:
                log.warning("could not publish worker stats to Redis (%s); will keep trying", e)
            self._failing = True
            return
        if self._failing:
            log.info("worker stats published again")
        self._failing = False

    def stop(self) -> None:
        """Stop the heartbeat and remove the key: a stopped worker leaves at once."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.delete(worker_key(self.stats.worker))
        except (redis.RedisError, OSError):
            pass  # its TTL removes it
        self.client.close()


_publisher: Publisher | None = None


def start(
    broker_url: str,
    *,
    worker: str,
    task: str,
    device: str,
    placement: Callable[[], tuple[int, str]],
    device_name: str = "cpu",
    memory: Callable[[], tuple[int, int, int]] | None = None,
) -> Publisher:
    """Begin publishing this worker's stats (called once the model is loaded).

    `placement` reads (tier, model name) and `memory` the device's (allocated,
    reserved, total) bytes at each publish (workers.device.memory_reader;
    None: zeros, a CPU worker)."""
    global _publisher
    stop()
    stats = WorkerStats(
        worker=worker,
        task=task,
        pid=os.getpid(),
        gpu=gpu_slot(),
        device=device,
        device_name=device_name,
        started_at=time.time(),
    )
    _publisher = Publisher(
        redis_client(broker_url), stats, placement=placement, memory=memory or (lambda: (0, 0, 0))
    )
    _publisher.start()
    return _publisher


def record(update: Callable[[WorkerStats], None]) -> None:
    """Apply an update to this worker's stats and publish them (no-op when not started)."""
    if _publisher is not None:
        _publisher.record(update)


def batch_finished(seconds: float, *, done: int, failed: int, run: Any) -> None:
    """A batch ran through the model and its results are committed. `run` is the
    runtime's BatchStats (ooms, downshifts, step_ups of this batch)."""
    record(
        lambda s: s.observe_batch(
            seconds=seconds,
            done=done,
            failed=failed,
            ooms=run.ooms,
            downshifts=run.downshifts,
            step_ups=run.step_ups,
        )
    )


def count_message(outcome: str, *, dead: int = 0) -> None:
    """A batch message that did not run through the model (stale, split, poison)."""

    def bump(s: WorkerStats) -> None:
        s.messages[outcome] = s.messages.get(outcome, 0) + 1
        s.items_dead += dead

    record(bump)


def stop() -> None:
    global _publisher
    if _publisher is not None:
        _publisher.stop()
        _publisher = None
