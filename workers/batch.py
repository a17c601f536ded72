"""The batch core: one batch message through the ledger and the runtime, in
named steps that end in one BatchOutcome, observed once (stats and log line):

    _duplicate        held by a live worker elsewhere (workers.heartbeat)
                      -> DUPLICATE: acknowledged without running
    _start            start_batch (rows still leased to this batch -> running,
                      a delivery counted per item); a batch of several pipeline
                      chunks is only read here and each chunk starts as the
                      reader takes it up (start_chunk), so a worker death makes
                      suspects of at most the two chunks in flight, not the
                      whole batch, and each row is written once to start
                      nothing left -> STALE: a stale or redelivered message
    _poison_split     delivered before and never finished (a worker died on it):
                      -> SPLIT: the clean items run together, each suspect alone;
                      -> DEAD: a suspect alone past its crash allowance
                      (workers.policy.poison_plan decides)
    heartbeat         the lease and the holder mark stay alive while it runs
    _run_pipeline     load inputs from Postgres (and audio from disk), run the
                      model (one result per item: bad input fails that item only),
                      finish_batch: results + states in one transaction (idempotent)
    _send_follow_ups  e.g. an intent batch for each finished transcript's item
    -> DONE, observed, then _signal: a waiting `fleet run` refills the queue now
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from config.taskconfig import TaskSpec
from db import ledger
from db.engine import transaction
from db.sources import load_inputs
from wire import stats as worker_stats
from wire.messages import BatchMessage, send_batch, signal_finished
from workers import cascade
from workers.adapters.base import Source
from workers.heartbeat import BatchHeartbeat, alive_elsewhere
from workers.policy import PoisonAction, poison_plan
from workers.runtime import BatchStats, ItemResult, MemoryNotReleased
from workers.state import WorkerState, restart_on

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
    poison = _poison_split(st, msg, started, start_counted=not by_chunk)
    if poison is not None:
        kind, parts, dead = poison
        suspects = sum(1 for i in started if i.deliveries_before > 0)
        return outcome(kind, len(started), parts=parts, dead=dead, suspects=suspects)
    with _heartbeat(st, msg, hostname):
        ran = _run_pipeline(st, msg, started, hostname=hostname if by_chunk else None)
        _send_follow_ups(st, ran.follow_ups)
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
    """Commit the start of the rows still leased to this batch (none: stale);
    `by_chunk`: only read them, each chunk starts as it is taken up."""
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
    st: WorkerState, msg: BatchMessage, started: list[ledger.StartedItem], *, start_counted: bool
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
                start_counted=start_counted,
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


# A batch larger than this runs as a pipeline of chunks of about this size:
# the next chunk's inputs are read, and the last chunk's results written, while
# the model runs the current one. Smaller batches run in one step.
PIPELINE_CHUNK = 1024


def chunk_plan(n: int, *, chunk: int = PIPELINE_CHUNK) -> list[tuple[int, int]]:
    """[(start, end)) slices cutting n items into pipeline chunks.

    One slice when n <= chunk; otherwise ceil(n / chunk) slices of
    ceil(n / parts) items each, the last one taking the rest."""
    if n <= chunk:
        return [(0, n)]
    parts = -(-n // chunk)
    size = -(-n // parts)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


FollowUps = dict[str, list[ledger.ClaimedBatch]]


@dataclass
class _Ran:
    """What running a started batch wrote: counts, the runtime's stats and the
    follow-up batches claimed (to send once all parts are written)."""

    counts: ledger.FinishCounts
    stats: BatchStats
    follow_ups: FollowUps = field(default_factory=dict)

    def add(self, got: ledger.FinishCounts, made: FollowUps) -> None:
        self.counts = ledger.FinishCounts(
            done=self.counts.done + got.done,
            failed=self.counts.failed + got.failed,
            skipped=self.counts.skipped + got.skipped,
        )
        for task, batches in made.items():
            self.follow_ups.setdefault(task, []).extend(batches)


def _run_pipeline(
    st: WorkerState, msg: BatchMessage, started: list[ledger.StartedItem], *, hostname: str | None
) -> _Ran:
    """Load inputs, run the model, write results and claim follow-ups (the lease
    kept alive meanwhile by the caller's heartbeat).

    A large batch is a three-stage pipeline over chunks (chunk_plan): a reader
    thread loads chunk k+1's inputs and a writer thread commits chunk k-1's
    results (finish_batch is status-guarded and idempotent per item, so a batch
    finished in parts is safe to redeliver) while this thread runs chunk k on
    the model. The database round trips then overlap the device's work.
    With `hostname` (a batch started by chunk), the reader starts each chunk
    under that worker name as it reads it (`ledger.start_chunk`).
    """
    stats = st.runtime.new_stats()
    slices = chunk_plan(len(started))
    if len(slices) == 1:
        part, sources = _read(st, msg, started, hostname)
        written = [_write(st, msg, part, sources, _run_model(st, sources, stats))]
    else:
        with (
            ThreadPoolExecutor(1, "batch-read") as reader,
            ThreadPoolExecutor(1, "batch-write") as writer,
        ):
            parts = [started[a:b] for a, b in slices]
            next_read: Future[tuple[list[ledger.StartedItem], list[Source]]]
            next_read = reader.submit(_read, st, msg, parts[0], hostname)
            writes: list[Future[tuple[ledger.FinishCounts, FollowUps]]] = []
            for k in range(len(parts)):
                part, sources = next_read.result()
                if k + 1 < len(parts):
                    next_read = reader.submit(_read, st, msg, parts[k + 1], hostname)
                results = _run_model(st, sources, stats)
                writes.append(writer.submit(_write, st, msg, part, sources, results))
            written = [w.result() for w in writes]
    st.runtime.settle(stats)
    ran = _Ran(ledger.FinishCounts(done=0, failed=0, skipped=0), stats)
    for got, made in written:
        ran.add(got, made)
    # Rows a chunk's start no longer found leased to this batch were skipped too.
    not_taken = len(started) - (ran.counts.done + ran.counts.failed + ran.counts.skipped)
    ran.add(ledger.FinishCounts(done=0, failed=0, skipped=not_taken), {})
    return ran


def _read(
    st: WorkerState, msg: BatchMessage, part: list[ledger.StartedItem], hostname: str | None
) -> tuple[list[ledger.StartedItem], list[Source]]:
    """The items of `part` that run and their sources (a deleted source row is
    simply absent). With `hostname`, the chunk is started first in the same
    transaction, and only the rows it started run (the others finished or were
    reclaimed meanwhile: skipped)."""
    with transaction(st.settings.db_url()) as session:
        if hostname is not None:
            taken = ledger.start_chunk(
                session,
                batch_id=msg.batch_id,
                item_ids=[i.item_id for i in part],
                worker=hostname,
                lease_seconds=st.settings.lease_seconds,
            )
            part = [i for i in part if i.item_id in taken]
        inputs = load_inputs(
            session,
            [(i.item_id, i.source_kind, i.source_id) for i in part],
            text_from_task=st.task.input_from,
        )
    kinds = {i.item_id: i.source_kind for i in part}
    sources = [
        Source(item_id, kinds[item_id], ext, data) for item_id, (ext, data) in inputs.items()
    ]
    return part, sources


def _run_model(st: WorkerState, sources: list[Source], stats: BatchStats) -> list[ItemResult]:
    """One result per source; exits the process (restart_on) when a tier's
    memory did not come back."""
    _crash_if_asked(st, sources)
    try:
        return st.runtime.run_items(sources, stats)
    except MemoryNotReleased as exc:
        restart_on(st, exc)
        raise


def _write(
    st: WorkerState,
    msg: BatchMessage,
    part: list[ledger.StartedItem],
    sources: list[Source],
    results: list[ItemResult],
) -> tuple[ledger.FinishCounts, FollowUps]:
    """Commit `part`'s results and states, and claim its follow-up items, in one
    transaction. An item whose source row is gone fails with that reason."""
    loaded = {src.item_id for src in sources}
    device = st.runtime.device
    escalated = {
        r.item_id
        for r in results
        if r.error is None
        and r.prediction is not None
        and cascade.should_escalate(st.task, r.prediction.label, r.prediction.confidence)
    }
    outcomes = [
        ledger.Outcome(r.item_id, _result_row(r, device, st.task, r.item_id in escalated), r.error)
        for r in results
    ]
    outcomes += [
        ledger.Outcome(i.item_id, None, "the source row was deleted before the item ran")
        for i in part
        if i.item_id not in loaded
    ]
    with transaction(st.settings.db_url()) as session:
        got = ledger.finish_batch(session, batch_id=msg.batch_id, outcomes=outcomes)
        made = _create_follow_ups(session, st, part, results, escalated)
    return got, made


def _result_row(
    r: ItemResult, device: str, task: TaskSpec, escalated: bool = False
) -> dict[str, Any] | None:
    if r.prediction is None:
        return None
    p = r.prediction
    output = dict(p.output or {})
    if r.notes:
        output.setdefault("notes", r.notes)
    if escalated:
        output.update(cascade.escalation_output(task))
    return {
        "label": p.label,
        "confidence": p.confidence,
        "scores": p.scores,
        "output": output or None,
        "model_name": r.model_name,
        "model_revision": r.model_revision,
        "model_tier": r.tier,
        "device": device,
        "latency_ms": round(r.latency_ms, 3),
    }


def _crash_if_asked(st: WorkerState, sources: list[Source]) -> None:
    """Testing aid (FLEET_CRASH_ON): die like a segfaulting CUDA kernel would."""
    if not st.settings.crash_on:
        return
    poison = {x.strip() for x in st.settings.crash_on.split(",") if x.strip()}
    hit = [s.external_id for s in sources if s.external_id in poison]
    if hit:
        log.error("crash_on: worker process dies on %s", hit)
        logging.shutdown()
        os._exit(137)


def _create_follow_ups(
    session: Any,
    st: WorkerState,
    started: list[ledger.StartedItem],
    results: list[ItemResult],
    escalated: set[int] | frozenset[int] = frozenset(),
) -> FollowUps:
    """Items for the tasks that follow this one (transcribe -> audio_intent) and for the
    stronger task of a cascade (the `escalated` item ids), claimed here and sent once the
    batch is written, so they never wait for a producer pass."""
    targets: list[tuple[str, list[int]]] = []
    if escalated and st.task.escalate_to:
        ids = [i.source_id for i in started if i.item_id in escalated]
        targets.append((st.task.escalate_to, ids))
    if not st.task.then:
        return _add_and_claim(session, st, targets)
    # A transcript with no speech in it has nothing to classify: no follow-up item.
    ok = {
        r.item_id
        for r in results
        if r.error is None
        and not (r.prediction and (r.prediction.output or {}).get("no_speech") is True)
    }
    source_ids = [i.source_id for i in started if i.item_id in ok]
    targets += [(task, source_ids) for task in st.task.then]
    return _add_and_claim(session, st, targets)


def _add_and_claim(
    session: Any, st: WorkerState, targets: list[tuple[str, list[int]]]
) -> FollowUps:
    kind = st.task.source
    out: FollowUps = {}
    for task, source_ids in targets:
        created = ledger.add_items(session, task=task, source_kind=kind, source_ids=source_ids)
        if created:
            out[task] = ledger.claim_batches(
                session,
                task=task,
                limit=created,
                batch_size=st.settings.batch_size,
                lease_seconds=st.settings.lease_seconds,
            )
    return out


def _send_follow_ups(st: WorkerState, follow_ups: FollowUps) -> None:
    for task, batches in follow_ups.items():
        for b in batches:
            send_batch(st.app, BatchMessage(task, b.batch_id, b.item_ids))


def _signal(st: WorkerState) -> None:
    """Wake a waiting `fleet run` so it refills the queue now (messages.signal_finished)."""
    client = st.broker_client()
    if client is None:
        return
    try:
        signal_finished(client, st.task.name)
    except Exception as e:  # the driver's poll picks the refill up anyway
        log.debug("finished signal not sent: %s", e)
