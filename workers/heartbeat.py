"""A running batch keeps itself alive: its lease in the ledger, and a mark in
Redis that says which worker holds it.

Without it, a batch that runs longer than `FLEET_LEASE_SECONDS` has its items
returned to pending by the reconciler mid-run, and one that runs longer than
the broker's visibility timeout is delivered again, to be taken for a dead
worker's batch (split, deliveries counted toward poison) while the live worker's
results are then skipped. With it:

    start_batch committed
      -> BatchHeartbeat.start: every `interval` seconds, on a daemon thread,
         extend the lease of the batch row (while this worker started it last) and
         SET fleet:batch:<batch_id> = <worker>  EX 3 x interval
    finish_batch committed (or the batch raised)
      -> BatchHeartbeat.stop: the mark is deleted, so a retry is not refused

A message whose batch holds a live mark of another worker is a duplicate
delivery: `alive_elsewhere` names the holder and the worker acknowledges the
message without touching the ledger. The mark expires within 3 x interval of a
worker's death (interval is a quarter of the shorter of lease and visibility
timeout), so the redelivery that follows a real crash, which comes only after
the visibility timeout, still counts as one.
"""

from __future__ import annotations

import logging
import math
import threading

import redis

from db import ledger
from db.engine import transaction
from wire import keys

log = logging.getLogger("fleet.worker")


def batch_key(batch_id: str) -> str:
    """The Redis key of a running batch's holder mark (wire.keys.batch_holder)."""
    return keys.batch_holder(batch_id)


def interval_for(*, lease_seconds: int, visibility_timeout: int) -> float:
    """Seconds between beats: a quarter of the shorter deadline, at least 1 s.

    Four beats fit in a lease, so a missed beat or two (a slow Postgres, a GIL
    held by a long tokenizer call) never lets a live batch's lease run out.
    """
    return max(1.0, min(lease_seconds, visibility_timeout) / 4)


def alive_elsewhere(client: redis.Redis, batch_id: str, *, me: str) -> str | None:
    """The worker that holds `batch_id` right now, if it is not `me`; else None.

    Raises redis.RedisError when Redis cannot be read (the caller decides).
    """
    raw = client.get(batch_key(batch_id))
    if raw is None:
        return None
    holder = raw.decode() if isinstance(raw, bytes) else str(raw)
    return None if holder == me else holder


class BatchHeartbeat:
    """Keeps one running batch's lease and holder mark alive until `stop`.

    `beat` is also callable directly (tests, or a caller with its own loop).
    Failures of one beat are logged and retried at the next; they never stop
    the batch: the ledger's status guards keep a late finish harmless.
    """

    def __init__(
        self,
        *,
        db_url: str,
        client: redis.Redis | None,
        batch_id: str,
        worker: str,
        lease_seconds: int,
        visibility_timeout: int,
    ) -> None:
        self.db_url = db_url
        self.batch_id, self.worker = batch_id, worker
        self.lease_seconds = lease_seconds
        self.interval = interval_for(
            lease_seconds=lease_seconds, visibility_timeout=visibility_timeout
        )
        self.ttl = max(2, math.ceil(3 * self.interval))
        self._client = client  # shared with the caller (thread-safe pool); not closed here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.extended = 0  # 1 when the last beat renewed the batch row's lease, else 0

    def mark(self) -> None:
        """Set the holder mark (also done by every beat)."""
        client = self._client
        if client is not None:
            client.set(batch_key(self.batch_id), self.worker, ex=self.ttl)

    def beat(self) -> int:
        """One beat: renew the batch row's lease and the mark.

        Returns 1 when the lease was renewed, 0 when the batch is no longer this worker's.
        """
        with transaction(self.db_url) as session:
            self.extended = ledger.extend_lease(
                session,
                batch_id=self.batch_id,
                lease_seconds=self.lease_seconds,
                worker=self.worker,
            )
        self.mark()
        self.beats += 1
        return self.extended

    def start(self) -> BatchHeartbeat:
        try:
            self.mark()
        except redis.RedisError as e:
            log.warning("batch %s: holder mark not set (%s); beats retry it", self.batch_id, e)
        self._thread = threading.Thread(
            target=self._run, name=f"lease-heartbeat-{self.batch_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.beat() == 0:
                    log.warning(
                        "batch %s is no longer this worker's to keep alive "
                        "(reclaimed during an outage?); its late results will be skipped",
                        self.batch_id,
                    )
            except Exception as e:  # Postgres or Redis blip: the next beat tries again
                log.warning("batch %s: lease heartbeat failed (%s); retrying", self.batch_id, e)

    def stop(self) -> None:
        """Stop beating and remove the mark if it is still this worker's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        client = self._client
        if client is None:
            return
        try:
            key = batch_key(self.batch_id)
            raw = client.get(key)
            holder = raw.decode() if isinstance(raw, bytes) else raw
            if holder == self.worker:
                client.delete(key)
        except redis.RedisError as e:
            log.debug("batch %s: holder mark left to expire (%s)", self.batch_id, e)

    def __enter__(self) -> BatchHeartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
