"""The worker process's resident state and the batch core.

`start_runtime` runs once when the worker starts (the model is loaded before
the first batch); `process` runs one batch message through the ledger and the
runtime:

    held by a live worker elsewhere (workers.heartbeat) -> duplicate delivery: done
    start_batch (rows still leased to this batch -> running)
      nothing left      -> stale or redelivered message: done
      delivered before  -> a worker died on it: split in halves, or dead if alone
    heartbeat starts: the lease and the holder mark stay alive while it runs
    load inputs from Postgres (and audio from disk)
    runtime.run       -> one outcome per item (bad input fails that item only)
    finish_batch      -> results + states in one transaction (idempotent)
    follow-up tasks   -> e.g. an intent item for each finished transcript
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from db import ledger
from db.engine import transaction
from db.sources import load_inputs
from fleet.config.settings import Settings
from fleet.config.taskconfig import TaskSpec, get_task, load_tasks
from workers import stats as worker_stats
from workers.adapters import make_adapter
from workers.adapters.base import Source
from workers.heartbeat import BatchHeartbeat, alive_elsewhere
from workers.messages import BatchMessage, send_batch, signal_finished
from workers.policy import PoisonAction, poison_plan
from workers.runtime import ItemResult, MemoryNotReleased, ModelRuntime

log = logging.getLogger("fleet.worker")


@dataclass
class WorkerState:
    settings: Settings
    task: TaskSpec
    tasks: dict[str, TaskSpec]
    runtime: ModelRuntime
    hostname: str
    app: Celery | None = None


_state: WorkerState | None = None


def start_runtime(
    settings: Settings, task_name: str, *, hostname: str, app: Celery | None = None
) -> WorkerState:
    global _state
    from fleet.config.logs import setup_logging
    from workers.device import pick_device
    from workers.simulate import MemorySimulator

    setup_logging(settings.log_level, json_lines=settings.log_json)
    tasks = load_tasks(settings.config_file)
    spec = get_task(tasks, task_name)
    adapter = make_adapter(
        spec, max_chars=settings.max_text_chars, audio_root=settings.resolved_audio_root
    )
    runtime = ModelRuntime(
        spec,
        adapter,
        models_dir=settings.resolved_models_dir,
        device=pick_device(),
        simulator=MemorySimulator.parse(settings.simulate_memory),
        start_at=_tier_hint(settings, spec.name),
        step_up_after=settings.step_up_after,
    )
    runtime.start()
    _state = WorkerState(settings, spec, tasks, runtime, hostname, app)
    if settings.broker_url is not None:  # live stats for `fleet status` / `fleet metrics`
        worker_stats.start(
            settings.redis_url(),
            worker=hostname,
            task=spec.name,
            device=runtime.device,
            placement=lambda: (runtime.tier, runtime.model_name),
        )
    return _state


def _hint_file(settings: Settings, task: str) -> Path:
    slot = os.environ.get("CUDA_VISIBLE_DEVICES") or "cpu"
    return settings.state_dir / "tier-hints" / f"{task}-gpu{slot}.tier"


def _tier_hint(settings: Settings, task: str) -> int | None:
    """FLEET_START_TIER, or the tier a previous process of this slot asked to
    restart on because its memory did not come back in-process."""
    if settings.start_tier is not None:
        return settings.start_tier
    hint = _hint_file(settings, task)
    if hint.is_file():
        tier = int(hint.read_text().strip() or 0)
        hint.unlink()
        log.warning("starting on tier %d as the previous worker asked", tier)
        return tier
    return None


def _restart_on(st: WorkerState, exc: MemoryNotReleased) -> None:
    hint = _hint_file(st.settings, st.task.name)
    hint.parent.mkdir(parents=True, exist_ok=True)
    hint.write_text(str(exc.next_tier))
    log.error("%s: exiting so the supervisor restarts this worker on tier %d", exc, exc.next_tier)
    logging.shutdown()
    # The batch is not acknowledged; its lease expires and the reconciler returns it.
    os._exit(75)


def stop_runtime() -> None:
    global _state
    if _state is not None:
        worker_stats.stop()
        _state.runtime.stop()
        _state = None


def current() -> WorkerState:
    if _state is None:
        raise RuntimeError("the worker runtime is not started (no model loaded)")
    return _state


def _result_row(r: ItemResult, device: str) -> dict[str, Any] | None:
    if r.prediction is None:
        return None
    p = r.prediction
    output = dict(p.output or {})
    if r.notes:
        output.setdefault("notes", r.notes)
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


# (batch_id, attempt) of the message whose start_batch this process committed
# last: a transient error after it is retried as a resume, not counted as a crash.
_started: tuple[str, int] | None = None


def batch_started(msg: BatchMessage) -> bool:
    """Did this process commit the start of this very message?"""
    return _started == (msg.batch_id, msg.attempt)


def _first_resume(settings: Settings, msg: BatchMessage) -> bool:
    """True for the first start of a resume message. A worker that dies on it has
    the same message redelivered: that start finds the key and counts as usual,
    so a crash loop is still isolated. Without Redis, count as usual."""
    client = _broker_client(settings) if msg.resume else None
    if client is None:
        return False
    try:
        key = f"fleet:resume:{msg.batch_id}:{msg.attempt}"
        return bool(client.set(key, 1, nx=True, ex=settings.visibility_timeout))
    except Exception as e:
        log.warning("batch %s: resume not recorded (%s); this start counts", msg.batch_id, e)
        return False


_redis: Any = None


def _broker_client(settings: Settings) -> Any:
    """This process's one Redis client for the batch path (holder marks, the
    finished signal): no connection set up per batch. None without a broker URL."""
    global _redis
    if settings.broker_url is None:
        return None
    if _redis is None:
        _redis = worker_stats.redis_client(settings.redis_url())
    return _redis


def _held_elsewhere(settings: Settings, msg: BatchMessage, hostname: str) -> str | None:
    """The live worker running this batch now, if another one (workers.heartbeat).
    Without Redis the delivery is treated as usual."""
    client = _broker_client(settings)
    if client is None:
        return None
    try:
        return alive_elsewhere(client, msg.batch_id, me=hostname)
    except Exception as e:
        log.warning("batch %s: holder mark not readable (%s); running as usual", msg.batch_id, e)
        return None


def _signal_finished(settings: Settings, task: str) -> None:
    """Wake a waiting `fleet run` so it refills the queue now (messages.signal_finished)."""
    client = _broker_client(settings)
    if client is None:
        return
    try:
        signal_finished(client, task)
    except Exception as e:  # the driver's poll picks the refill up anyway
        log.debug("finished signal not sent: %s", e)


def process(msg: BatchMessage, *, hostname: str) -> dict[str, Any]:
    global _started
    st = current()
    s = st.settings
    url = s.db_url()
    started_at = time.perf_counter()
    _started = None
    if msg.task != st.task.name:
        raise ValueError(f"this worker serves {st.task.name!r}, got a batch for {msg.task!r}")
    holder = _held_elsewhere(s, msg, hostname)
    if holder is not None:
        log.warning(
            "batch %s is running on %s right now (its heartbeat is alive): this delivery is a "
            "duplicate (the broker's visibility timeout passed while it ran), acknowledged "
            "without running; nothing is split or counted as a crash",
            msg.batch_id,
            holder,
        )
        worker_stats.count_message("duplicate")
        return {"batch": msg.batch_id, "duplicate_of": holder}
    resume = _first_resume(s, msg)
    with transaction(url) as session:
        started = ledger.start_batch(
            session,
            batch_id=msg.batch_id,
            item_ids=msg.item_ids,
            worker=hostname,
            lease_seconds=s.lease_seconds,
            resume=resume,
        )
    _started = (msg.batch_id, msg.attempt)
    if not started:
        log.info("batch %s: nothing leased to it any more (stale or redelivered)", msg.batch_id)
        worker_stats.count_message("stale")
        return {"batch": msg.batch_id, "skipped": len(msg.item_ids)}

    ids = [i.item_id for i in started]
    plan = poison_plan(
        [(i.item_id, i.deliveries_before) for i in started], crashes_allowed=s.poison_crashes
    )
    if plan.action is PoisonAction.SPLIT:
        with transaction(url) as session:
            parts = ledger.split_batch(
                session,
                batch_id=msg.batch_id,
                parts=plan.parts,
                lease_seconds=s.lease_seconds,
                reset_deliveries=False,
            )
        for part in parts:
            send_batch(_app(st), BatchMessage(msg.task, part.batch_id, part.item_ids))
        suspects = sum(1 for i in started if i.deliveries_before > 0)
        log.warning(
            "batch %s was delivered before and never finished (a worker died): "
            "split, %d suspect(s) now run alone, %d other item(s) together",
            msg.batch_id,
            suspects,
            len(started) - suspects,
        )
        worker_stats.count_message("split")
        return {"batch": msg.batch_id, "split": [p.batch_id for p in parts]}
    if plan.action is PoisonAction.DEAD:
        reason = (
            f"the worker process died {started[0].deliveries_before} times running this item "
            "(alone after the first death): isolated as poison. Inspect the input, then "
            "`fleet retry --status dead`."
        )
        with transaction(url) as session:
            ledger.mark_dead(session, batch_id=msg.batch_id, item_ids=ids, reason=reason)
        log.error("batch %s: item %s is poison, marked dead", msg.batch_id, ids)
        worker_stats.count_message("poison", dead=len(ids))
        return {"batch": msg.batch_id, "dead": ids}

    heartbeat = BatchHeartbeat(
        db_url=url,
        client=_broker_client(s),
        batch_id=msg.batch_id,
        worker=hostname,
        lease_seconds=s.lease_seconds,
        visibility_timeout=s.visibility_timeout,
    )
    with heartbeat:
        return _run_started(st, msg, started, ids, started_at=started_at)


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


def _run_started(
    st: WorkerState,
    msg: BatchMessage,
    started: list[ledger.StartedItem],
    ids: list[int],
    *,
    started_at: float,
) -> dict[str, Any]:
    """Load inputs, run the model, write results and follow-ups (the lease kept
    alive meanwhile by the caller's heartbeat).

    A large batch is a three-stage pipeline over chunks (chunk_plan): a reader
    thread loads chunk k+1's inputs and a writer thread commits chunk k-1's
    results (finish_batch is status-guarded and idempotent per item, so a batch
    finished in parts is safe to redeliver) while this thread runs chunk k on
    the model. The database round trips then overlap the device's work.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    url = st.settings.db_url()
    device = st.runtime.device
    slices = chunk_plan(len(started))
    stats = st.runtime.new_stats()
    counts = ledger.FinishCounts(done=0, failed=0, skipped=0)
    follow: dict[str, list[ledger.ClaimedBatch]] = {}

    def read(part: list[ledger.StartedItem]) -> list[Source]:
        with transaction(url) as session:
            inputs = load_inputs(
                session,
                [(i.item_id, i.source_kind, i.source_id) for i in part],
                text_from_task=st.task.input_from,
            )
        kinds = {i.item_id: i.source_kind for i in part}
        return [
            Source(item_id, kinds[item_id], ext, data) for item_id, (ext, data) in inputs.items()
        ]

    def write(
        part: list[ledger.StartedItem], sources: list[Source], results: list[ItemResult]
    ) -> tuple[ledger.FinishCounts, dict[str, list[ledger.ClaimedBatch]]]:
        loaded = {src.item_id for src in sources}
        outcomes = [ledger.Outcome(r.item_id, _result_row(r, device), r.error) for r in results]
        outcomes += [
            ledger.Outcome(i.item_id, None, "the source row was deleted before the item ran")
            for i in part
            if i.item_id not in loaded
        ]
        with transaction(url) as session:
            got = ledger.finish_batch(session, batch_id=msg.batch_id, outcomes=outcomes)
            made = _create_follow_ups(session, st, part, results)
        return got, made

    def run_model(sources: list[Source]) -> list[ItemResult]:
        _crash_if_asked(st, sources)
        try:
            return st.runtime.run_items(sources, stats)
        except MemoryNotReleased as exc:
            _restart_on(st, exc)
            raise

    if len(slices) == 1:
        sources = read(started)
        results = run_model(sources)
        written = [write(started, sources, results)]
    else:
        with (
            ThreadPoolExecutor(1, "batch-read") as reader,
            ThreadPoolExecutor(1, "batch-write") as writer,
        ):
            parts = [started[a:b] for a, b in slices]
            next_read: Future[list[Source]] = reader.submit(read, parts[0])
            writes: list[Future[Any]] = []
            for k, part in enumerate(parts):
                sources = next_read.result()
                if k + 1 < len(parts):
                    next_read = reader.submit(read, parts[k + 1])
                results = run_model(sources)
                writes.append(writer.submit(write, part, sources, results))
            written = [w.result() for w in writes]
    st.runtime.settle(stats)
    for got, made in written:
        counts = ledger.FinishCounts(
            done=counts.done + got.done,
            failed=counts.failed + got.failed,
            skipped=counts.skipped + got.skipped,
        )
        for task, batches in made.items():
            follow.setdefault(task, []).extend(batches)
    for task, batches in follow.items():
        for b in batches:
            send_batch(_app(st), BatchMessage(task, b.batch_id, b.item_ids))
    line = {
        "event": "batch",
        "task": st.task.name,
        "batch": msg.batch_id,
        "items": len(ids),
        "done": counts.done,
        "failed": counts.failed,
        "skipped": counts.skipped,
        "sub_batches": stats.sub_batches,
        "budget": stats.budget_end,
        "tier": st.runtime.tier,
        "model": st.runtime.model_name,
        "device": device,
        "ooms": stats.ooms,
        "downshifts": stats.downshifts,
        "seconds": round(time.perf_counter() - started_at, 3),
        "attempt": msg.attempt,
    }
    worker_stats.batch_finished(
        time.perf_counter() - started_at, done=counts.done, failed=counts.failed, run=stats
    )
    _signal_finished(st.settings, st.task.name)
    log.info("batch %s", json.dumps(line))
    return {k: line[k] for k in ("items", "done", "failed", "skipped", "tier", "ooms")}


def _create_follow_ups(
    session: Any, st: WorkerState, started: list[ledger.StartedItem], results: list[ItemResult]
) -> dict[str, list[ledger.ClaimedBatch]]:
    """Items for the tasks that follow this one (transcribe -> audio_intent), claimed
    and sent right away so they never wait for a producer pass."""
    if not st.task.then:
        return {}
    # A transcript with no speech in it has nothing to classify: no follow-up item.
    ok = {
        r.item_id
        for r in results
        if r.error is None
        and not (r.prediction and (r.prediction.output or {}).get("no_speech") is True)
    }
    source_ids = [i.source_id for i in started if i.item_id in ok]
    kind = st.task.source
    out: dict[str, list[ledger.ClaimedBatch]] = {}
    for task in st.task.then:
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


def _app(st: WorkerState) -> Celery:
    if st.app is None:
        from workers.app import app

        st.app = app
    return st.app
