"""The pipeline of one started batch: inputs read, the model run, results written.

A batch larger than PIPELINE_CHUNK runs as a three-stage pipeline over chunks
(chunk_plan): a reader thread loads chunk k+1's inputs (taking the chunk up in
the ledger first, `ledger.start_chunk`, when the batch was started by chunk),
this thread runs chunk k on the model, and a writer thread commits chunk k-1's
results and claims its follow-up items (`ledger.finish_batch`, status-guarded
and idempotent per item; the last chunk's write closes the batch). The
database round trips overlap the device's work. A result is a typed
`ledger.ResultRow` (`result_row`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from config.taskconfig import TaskSpec
from db import ledger
from db.engine import transaction
from db.sources import load_inputs
from wire.messages import BatchMessage, send_batch
from workers import cascade
from workers.adapters.base import Source
from workers.runtime import BatchStats, ItemResult, MemoryNotReleased
from workers.state import WorkerState, restart_on

log = logging.getLogger("fleet.worker")


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
class Ran:
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


def run_pipeline(
    st: WorkerState, msg: BatchMessage, started: list[ledger.StartedItem], *, hostname: str | None
) -> Ran:
    """Load inputs, run the model, write results and claim follow-ups (the lease
    kept alive meanwhile by the caller's heartbeat).

    A large batch is a three-stage pipeline over chunks (chunk_plan): a reader
    thread loads chunk k+1's inputs and a writer thread commits chunk k-1's
    results (finish_batch is status-guarded and idempotent per item, so a batch
    finished in parts is safe to redeliver) while this thread runs chunk k on
    the model. The database round trips then overlap the device's work.
    With `hostname` (a batch started by chunk), the reader takes each chunk up
    under that worker name as it reads it (`ledger.start_chunk`). The last
    chunk's write closes the batch.
    """
    stats = st.runtime.new_stats()
    slices = chunk_plan(len(started))
    if len(slices) == 1:
        part, sources = _read(st, msg, started, hostname)
        written = [_write(st, msg, part, sources, _run_model(st, sources, stats), last=True)]
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
                last = k + 1 == len(parts)
                writes.append(writer.submit(_write, st, msg, part, sources, results, last=last))
            written = [w.result() for w in writes]
    st.runtime.settle(stats)
    ran = Ran(ledger.FinishCounts(done=0, failed=0, skipped=0), stats)
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
    *,
    last: bool,
) -> tuple[ledger.FinishCounts, FollowUps]:
    """Commit `part`'s results and states, and claim its follow-up items, in one
    transaction; `last` (the batch's last chunk) closes the batch. An item
    whose source row is gone fails with that reason."""
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
        ledger.Outcome(r.item_id, result_row(r, device, st.task, r.item_id in escalated), r.error)
        for r in results
    ]
    outcomes += [
        ledger.Outcome(i.item_id, None, "the source row was deleted before the item ran")
        for i in part
        if i.item_id not in loaded
    ]
    with transaction(st.settings.db_url()) as session:
        got = ledger.finish_batch(session, batch_id=msg.batch_id, outcomes=outcomes, last=last)
        made = _create_follow_ups(session, st, part, results, escalated)
    return got, made


def result_row(
    r: ItemResult, device: str, task: TaskSpec, escalated: bool = False
) -> ledger.ResultRow | None:
    """The results row of one item's prediction (None: the item has none)."""
    if r.prediction is None:
        return None
    p = r.prediction
    output = dict(p.output or {})
    if r.notes:
        output.setdefault("notes", r.notes)
    if escalated:
        output.update(cascade.escalation_output(task))
    return ledger.ResultRow(
        label=p.label,
        confidence=p.confidence,
        scores=p.scores,
        output=output or None,
        model_name=r.model_name,
        model_revision=r.model_revision,
        model_tier=r.tier,
        device=device,
        latency_ms=round(r.latency_ms, 3),
    )


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


def send_follow_ups(st: WorkerState, follow_ups: FollowUps) -> None:
    for task, batches in follow_ups.items():
        for b in batches:
            send_batch(st.app, BatchMessage(task, b.batch_id, b.item_ids))
