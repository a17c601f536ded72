"""The batch core: one batch message through the ledger and the runtime, in
named steps that end in one BatchOutcome, observed once (stats and log line):

    _duplicate        held by a live worker elsewhere (workers.heartbeat)
                      -> DUPLICATE: acknowledged without running
    _start            start_batch (the batch row counts the delivery and takes
                      the lease; its items still its own are read; a worker
                      death on an earlier start is counted on the items of the
                      chunks it had taken up); a batch of several pipeline
                      chunks takes each chunk up as the reader reaches it
                      (start_chunk), so a worker death makes suspects of at
                      most the two chunks in flight, not the whole batch
                      nothing left -> STALE: a stale or redelivered message
    _poison_split     delivered before and never finished (a worker died on it):
                      -> SPLIT: the clean items run together, each suspect alone;
                      -> DEAD: a suspect alone past its crash allowance
                      (workers.policy.poison_plan decides)
    heartbeat         the lease and the holder mark stay alive while it runs
    run_pipeline      load inputs from Postgres (and audio from disk), run the
                      model (one result per item: bad input fails that item only),
                      finish_batch: results + states in one transaction (idempotent)
                      (workers.pipeline)
    send_follow_ups   e.g. an intent batch for each finished transcript's item
    -> DONE, observed, then _signal: a waiting `fleet run` refills the queue now
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from db import ledger
from db.engine import transaction
from wire import stats as worker_stats
from wire.messages import BatchMessage, send_batch, signal_finished
from workers.heartbeat import BatchHeartbeat, alive_elsewhere
from workers.pipeline import PIPELINE_CHUNK, chunk_plan, run_pipeline, send_follow_ups
from workers.policy import PoisonAction, poison_plan
from workers.runtime import BatchStats
from workers.state import WorkerState

__all__ = [
    "PIPELINE_CHUNK",
    "BatchAttempt",
    "BatchKind",
    "BatchOutcome",
    "chunk_plan",
    "observe",
    "process",
]

log = logging.getLogger("fleet.worker")


class BatchKind(StrEnum):
    """What became of one batch message."""

    DONE = "done"  # ran; results written
    STALE = "stale"  # nothing leased to it any more
    DUPLICATE = "duplicate"  # running on a live worker elsewhere
    SPLIT = "split"  # a worker died on it: re-sent as smaller batches
    DEAD = "dead"  # its one item killed workers too often: marked dead


@dataclass(frozen=True)
class BatchOutcome:
    """One batch message's result: what happened, counts and timings.

    `items` is the number of items the message named (STALE) or that started
    (otherwise); `seconds` is wall time from receipt to the outcome."""

    kind: BatchKind
    task: str
    batch_id: str
    attempt: int
    items: int
    seconds: float
    done: int = 0
    failed: int = 0
    skipped: int = 0
    holder: str | None = None  # DUPLICATE: the worker running it now
    parts: tuple[str, ...] = ()  # SPLIT: the batches it was split into
    suspects: int = 0  # SPLIT: items delivered before, each in a batch of its own now
    dead: tuple[int, ...] = ()  # DEAD: the item ids marked dead
    run: BatchStats | None = None  # DONE: the runtime's sub-batches, OOMs, tiers
    tier: int | None = None  # DONE: the tier the runtime holds after the batch
    model: str | None = None
    device: str | None = None

    def summary(self) -> dict[str, Any]:
        """The task's (JSON) return value, shown in the worker's own log."""
        if self.kind is BatchKind.DUPLICATE:
            return {"batch": self.batch_id, "duplicate_of": self.holder}
        if self.kind is BatchKind.STALE:
            return {"batch": self.batch_id, "skipped": self.skipped}
        if self.kind is BatchKind.SPLIT:
            return {"batch": self.batch_id, "split": list(self.parts)}
        if self.kind is BatchKind.DEAD:
            return {"batch": self.batch_id, "dead": list(self.dead)}
        return {
            "items": self.items,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "tier": self.tier,
            "ooms": self.run.ooms if self.run else 0,
        }

    def log_line(self) -> dict[str, Any]:
        """The JSON `batch {...}` line of a DONE batch (its key order is read by tools)."""
        run = self.run or BatchStats()
        return {
            "event": "batch",
            "task": self.task,
            "batch": self.batch_id,
            "items": self.items,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "sub_batches": run.sub_batches,
            "budget": run.budget_end,
            "tier": self.tier,
            "model": self.model,
            "device": self.device,
            "ooms": run.ooms,
            "downshifts": run.downshifts,
            "seconds": round(self.seconds, 3),
            "attempt": self.attempt,
        }


@dataclass
class BatchAttempt:
    """One delivery of a message, as the task layer sees it: `started` once this
    process committed the message's start_batch. A transient error after that
    is retried as a resume, not counted as a crash on the next start."""

    msg: BatchMessage
    started: bool = False


def process(st: WorkerState, attempt: BatchAttempt, *, hostname: str) -> BatchOutcome:
    """Run one batch message through the steps above; observe the outcome once.

    Raises ValueError for a message of another task; database and broker
    errors propagate (the task layer decides on a retry with `attempt`).
    """
    msg = attempt.msg
    if msg.task != st.task.name:
        raise ValueError(f"this worker serves {st.task.name!r}, got a batch for {msg.task!r}")
    outcome = _steps(st, attempt, hostname=hostname, started_at=time.perf_counter())
    observe(outcome)
    if outcome.kind is BatchKind.DONE:
        _signal(st)
    return outcome


def _steps(
    st: WorkerState, attempt: BatchAttempt, *, hostname: str, started_at: float
) -> BatchOutcome:
    msg = attempt.msg

    def outcome(kind: BatchKind, items: int, **kw: Any) -> BatchOutcome:
        seconds = time.perf_counter() - started_at
        return BatchOutcome(kind, msg.task, msg.batch_id, msg.attempt, items, seconds, **kw)

    holder = _duplicate(st, msg, hostname)
    if holder is not None:
        return outcome(BatchKind.DUPLICATE, len(msg.item_ids), holder=holder)
    resume = _first_resume(st, msg)
    # A batch of several pipeline chunks starts each chunk as it is taken up:
    # a worker that dies makes suspects of those, not of all.
    by_chunk = not resume and len(msg.item_ids) > PIPELINE_CHUNK
    started = _start(st, msg, hostname, resume=resume, by_chunk=by_chunk)
    attempt.started = True
    if not started:
        n = len(msg.item_ids)
        return outcome(BatchKind.STALE, n, skipped=n)
    poison = _poison_split(st, msg, started)
    if poison is not None:
        kind, parts, dead = poison
        suspects = sum(1 for i in started if i.deliveries_before > 0)
        return outcome(kind, len(started), parts=parts, dead=dead, suspects=suspects)
    with _heartbeat(st, msg, hostname):
        ran = run_pipeline(st, msg, started, hostname=hostname if by_chunk else None)
        send_follow_ups(st, ran.follow_ups)
    rt = st.runtime
    return outcome(
        BatchKind.DONE,
        len(started),
        done=ran.counts.done,
        failed=ran.counts.failed,
        skipped=ran.counts.skipped,
        run=ran.stats,
        tier=rt.tier,
        model=rt.model_name,
        device=rt.device,
    )


def observe(outcome: BatchOutcome) -> None:
    """Count the outcome in the worker's live stats and log its line."""
    o = outcome
    if o.kind is BatchKind.DUPLICATE:
        log.warning(
            "batch %s is running on %s right now (its heartbeat is alive): this delivery is a "
            "duplicate (the broker's visibility timeout passed while it ran), acknowledged "
            "without running; nothing is split or counted as a crash",
            o.batch_id,
            o.holder,
        )
        worker_stats.count_message("duplicate")
    elif o.kind is BatchKind.STALE:
        log.info("batch %s: nothing leased to it any more (stale or redelivered)", o.batch_id)
        worker_stats.count_message("stale")
    elif o.kind is BatchKind.SPLIT:
        log.warning(
            "batch %s was delivered before and never finished (a worker died): "
            "split, %d suspect(s) now run alone, %d other item(s) together",
            o.batch_id,
            o.suspects,
            o.items - o.suspects,
        )
        worker_stats.count_message("split")
    elif o.kind is BatchKind.DEAD:
        log.error("batch %s: item %s is poison, marked dead", o.batch_id, list(o.dead))
        worker_stats.count_message("poison", dead=len(o.dead))
    else:
        worker_stats.batch_finished(o.seconds, done=o.done, failed=o.failed, run=o.run)
        log.info("batch %s", json.dumps(o.log_line()))


# -- the steps ------------------------------------------------------------------


def _duplicate(st: WorkerState, msg: BatchMessage, hostname: str) -> str | None:
    """The live worker running this batch now, if another one (workers.heartbeat).
    Without Redis the delivery is treated as usual."""
    client = st.broker_client()
    if client is None:
        return None
    try:
        return alive_elsewhere(client, msg.batch_id, me=hostname)
    except Exception as e:
        log.warning("batch %s: holder mark not readable (%s); running as usual", msg.batch_id, e)
        return None


def _start(
    st: WorkerState, msg: BatchMessage, hostname: str, *, resume: bool, by_chunk: bool
) -> list[ledger.StartedItem]:
    """Commit the batch's start and read its items still its own (none: stale);
    `by_chunk`: no chunk is taken up yet, each one is as the reader reaches it."""
    with transaction(st.settings.db_url()) as session:
        return ledger.start_batch(
            session,
            batch_id=msg.batch_id,
            item_ids=msg.item_ids,
            worker=hostname,
            lease_seconds=st.settings.lease_seconds,
            resume=resume,
            by_chunk=by_chunk,
        )


def _first_resume(st: WorkerState, msg: BatchMessage) -> bool:
    """True for the first start of a resume message. A worker that dies on it has
    the same message redelivered: that start finds the key and counts as usual,
    so a crash loop is still isolated. Without Redis, count as usual."""
    client = st.broker_client() if msg.resume else None
    if client is None:
        return False
    try:
        key = f"fleet:resume:{msg.batch_id}:{msg.attempt}"
        return bool(client.set(key, 1, nx=True, ex=st.settings.visibility_timeout))
    except Exception as e:
        log.warning("batch %s: resume not recorded (%s); this start counts", msg.batch_id, e)
        return False


def _poison_split(
    st: WorkerState, msg: BatchMessage, started: list[ledger.StartedItem]
) -> tuple[BatchKind, tuple[str, ...], tuple[int, ...]] | None:
    """Apply workers.policy.poison_plan: None to run the batch; otherwise
    (SPLIT, new batch ids, ()) once the parts are committed and sent, or
    (DEAD, (), item ids) once the lone suspect is marked dead."""
    s = st.settings
    plan = poison_plan(
        [(i.item_id, i.deliveries_before) for i in started], crashes_allowed=s.poison_crashes
    )
    if plan.action is PoisonAction.SPLIT:
        with transaction(s.db_url()) as session:
            parts = ledger.split_batch(
                session,
                batch_id=msg.batch_id,
                parts=plan.parts,
                lease_seconds=s.lease_seconds,
                reset_deliveries=False,
            )
        for part in parts:
            send_batch(st.app, BatchMessage(msg.task, part.batch_id, part.item_ids))
        return BatchKind.SPLIT, tuple(p.batch_id for p in parts), ()
    if plan.action is PoisonAction.DEAD:
        ids = [i.item_id for i in started]
        reason = (
            f"the worker process died {started[0].deliveries_before} times running this item "
            "(alone after the first death): isolated as poison. Inspect the input, then "
            "`fleet retry --status dead`."
        )
        with transaction(s.db_url()) as session:
            ledger.mark_dead(session, batch_id=msg.batch_id, item_ids=ids, reason=reason)
        return BatchKind.DEAD, (), tuple(ids)
    return None


def _heartbeat(st: WorkerState, msg: BatchMessage, hostname: str) -> BatchHeartbeat:
    s = st.settings
    return BatchHeartbeat(
        db_url=s.db_url(),
        client=st.broker_client(),
        batch_id=msg.batch_id,
        worker=hostname,
        lease_seconds=s.lease_seconds,
        visibility_timeout=s.visibility_timeout,
    )


def _signal(st: WorkerState) -> None:
    """Wake a waiting `fleet run` so it refills the queue now (messages.signal_finished)."""
    client = st.broker_client()
    if client is None:
        return
    try:
        signal_finished(client, st.task.name)
    except Exception as e:  # the driver's poll picks the refill up anyway
        log.debug("finished signal not sent: %s", e)
