"""workers.batch.process: one batch message in, one BatchOutcome out.

The model is the faked boundary: a real ModelRuntime over the `fake` adapter
(workers.adapters.fake implements the Adapter interface and labels by a hash
of the text), with the memory simulator raising the real out-of-memory error.
Everything else is real: the ledger is the test database on the local Postgres
(`db_url`), the broker a Redis database of the test's own (`broker_url`), and
the message goes to `process` as the task layer hands it over, without a
Celery worker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from config.settings import Settings
from config.taskconfig import TaskSpec, TierSpec
from db import ledger
from db.engine import transaction
from db.sources import ingest_conversations
from tests.support import conversations, result_count_per_item, status_counts
from wire import keys
from wire.app import create_app
from wire.messages import BatchMessage
from workers.adapters.fake import LABELS, FakeAdapter
from workers.batch import PIPELINE_CHUNK, BatchAttempt, BatchKind, BatchOutcome, chunk_plan, process
from workers.runtime import ModelRuntime
from workers.simulate import MemorySimulator
from workers.state import WorkerState

TASK = "t"
HOST = "t@cpu-unit"

MakeWorker = Callable[..., WorkerState]


@pytest.fixture
def make_worker(db_url: str, broker_url: str, tmp_path: Path) -> Iterator[MakeWorker]:
    """A worker's resident state for task `t`: `tiers` fake models, an optional
    memory simulator ("0:0,1:1000"), settings on the test database and broker."""
    made: list[WorkerState] = []

    def make(*, tiers: int = 1, memory: str | None = None, **settings: Any) -> WorkerState:
        ladder = []
        for i in range(tiers):
            folder = tmp_path / f"tier{i}"
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_text("{}")
            ladder.append(TierSpec(name=f"tier{i}", path=str(folder), max_batch_tokens=1000))
        spec = TaskSpec(TASK, "fake", "conversation", tuple(ladder))
        s = Settings(
            database_url=db_url, broker_url=broker_url, state_dir=tmp_path / "state", **settings
        )
        runtime = ModelRuntime(
            spec,
            FakeAdapter(),
            models_dir=tmp_path,
            device="cpu",
            simulator=MemorySimulator.parse(memory),
        )
        runtime.start()
        st = WorkerState(s, spec, {TASK: spec}, runtime, HOST, create_app(s))
        made.append(st)
        return st

    yield make
    for st in made:
        st.runtime.stop()
        if st._redis is not None:
            st._redis.close()


def _claim(url: str, rows: list[dict[str, Any]]) -> BatchMessage:
    """Ingest `rows`, discover them for the task and claim them as one batch."""
    with transaction(url) as session:
        ingest_conversations(session, rows)
        ledger.discover(session, task=TASK, source_kind="conversation")
        (claimed,) = ledger.claim_batches(
            session, task=TASK, limit=len(rows), batch_size=len(rows), lease_seconds=600
        )
    return BatchMessage(TASK, claimed.batch_id, claimed.item_ids)


def _run(st: WorkerState, msg: BatchMessage) -> BatchOutcome:
    return process(st, BatchAttempt(msg), hostname=HOST)


def _items(url: str) -> dict[str, tuple[str, str | None, int | None]]:
    """external_id -> (status, last_error, model_tier of its result)."""
    with transaction(url) as session:
        rows = session.execute(
            text(
                "SELECT c.external_id, w.status, w.last_error, r.model_tier FROM work_items w "
                "JOIN conversations c ON c.id = w.source_id "
                "LEFT JOIN results r ON r.work_item_id = w.id WHERE w.task = :t"
            ),
            {"t": TASK},
        ).all()
    return {e: (s, err, tier) for e, s, err, tier in rows}


def _broker(st: WorkerState) -> redis.Redis:
    client = st.broker_client()
    assert client is not None
    return client


def test_a_batch_runs_every_item_and_the_outcome_counts_them(make_worker, db_url):
    st = make_worker()
    msg = _claim(db_url, conversations(12))
    outcome = _run(st, msg)

    assert outcome.kind is BatchKind.DONE
    assert (outcome.task, outcome.batch_id, outcome.attempt) == (TASK, msg.batch_id, 0)
    assert (outcome.items, outcome.done, outcome.failed, outcome.skipped) == (12, 12, 0, 0)
    assert (outcome.tier, outcome.model, outcome.device) == (0, "tier0", "cpu")
    assert outcome.run is not None and outcome.run.ooms == 0 and outcome.run.sub_batches >= 1
    summary = {"items": 12, "done": 12, "failed": 0, "skipped": 0, "tier": 0, "ooms": 0}
    assert outcome.summary() == summary
    assert status_counts(db_url, TASK) == {"done": 12}
    assert set(result_count_per_item(db_url, TASK).values()) == {1}
    with transaction(db_url) as session:
        labels = {r[0] for r in session.execute(text("SELECT label FROM results")).all()}
        open_batches = session.execute(text("SELECT count(*) FROM batches")).scalar_one()
    assert labels <= set(LABELS)
    assert open_batches == 0  # the last write closed the batch
    # A waiting `fleet run` is woken: the task's name is on the finished list.
    assert _broker(st).lrange(keys.FINISHED, 0, -1) == [TASK.encode()]


def test_bad_input_fails_its_item_with_the_reason_and_the_rest_run(make_worker, db_url):
    st = make_worker()
    rows = conversations(6)
    rows[2]["messages"] = [{"role": "user", "content": "\u200b \u200b"}]
    outcome = _run(st, _claim(db_url, rows))

    assert outcome.kind is BatchKind.DONE
    assert (outcome.items, outcome.done, outcome.failed, outcome.skipped) == (6, 5, 1, 0)
    items = _items(db_url)
    status, error, tier = items[rows[2]["external_id"]]
    assert status == "failed" and tier is None
    assert error is not None and "only empty messages" in error
    assert {items[r["external_id"]][0] for r in rows if r is not rows[2]} == {"done"}
    assert json.loads(json.dumps(outcome.log_line()))["failed"] == 1


def test_out_of_memory_on_every_budget_steps_down_and_the_outcome_says_so(make_worker, db_url):
    """The step-down is the runtime's (workers.policy.on_oom); the outcome carries it:
    the OOMs, the downshift, the tier and model the items ran on."""
    st = make_worker(tiers=2, memory="0:0,1:100000")
    rows = conversations(8)
    outcome = _run(st, _claim(db_url, rows))

    assert outcome.kind is BatchKind.DONE and outcome.done == 8 and outcome.failed == 0
    assert outcome.run is not None
    assert outcome.run.ooms >= 1 and outcome.run.downshifts == 1
    assert (outcome.tier, outcome.model) == (1, "tier1")
    assert outcome.summary()["ooms"] == outcome.run.ooms
    line = outcome.log_line()
    assert (line["ooms"], line["downshifts"], line["tier"]) == (outcome.run.ooms, 1, 1)
    assert {tier for _, _, tier in _items(db_url).values()} == {1}


def test_out_of_memory_on_the_smallest_tier_fails_that_item_only(make_worker, db_url):
    st = make_worker(tiers=1, memory="0:45")  # a sub-batch above 45 padded tokens: out of memory
    rows = conversations(5)
    rows[1]["messages"] = [{"role": "user", "content": "long " * 60}]
    outcome = _run(st, _claim(db_url, rows))

    assert outcome.kind is BatchKind.DONE
    assert (outcome.done, outcome.failed) == (4, 1)
    status, error, _ = _items(db_url)[rows[1]["external_id"]]
    assert status == "failed" and error is not None
    assert "out of memory on the smallest model (tier0)" in error


def test_a_redelivered_message_is_stale_and_changes_nothing(make_worker, db_url):
    st = make_worker()
    msg = _claim(db_url, conversations(5))
    first = _run(st, msg)
    before = (_items(db_url), result_count_per_item(db_url, TASK))

    again = _run(st, msg)

    assert first.kind is BatchKind.DONE and first.done == 5
    assert again.kind is BatchKind.STALE
    assert (again.items, again.skipped, again.done) == (5, 5, 0)
    assert again.summary() == {"batch": msg.batch_id, "skipped": 5}
    assert (_items(db_url), result_count_per_item(db_url, TASK)) == before
    # Only the run that wrote results wakes the driver.
    assert _broker(st).llen(keys.FINISHED) == 1


def test_a_message_held_by_a_live_worker_elsewhere_is_a_duplicate(make_worker, db_url):
    st = make_worker()
    msg = _claim(db_url, conversations(3))
    _broker(st).set(keys.batch_holder(msg.batch_id), "t@gpu1-other", ex=60)

    outcome = _run(st, msg)

    assert outcome.kind is BatchKind.DUPLICATE and outcome.holder == "t@gpu1-other"
    assert outcome.summary() == {"batch": msg.batch_id, "duplicate_of": "t@gpu1-other"}
    with transaction(db_url) as session:
        deliveries = session.execute(
            text("SELECT deliveries FROM batches WHERE batch_id = CAST(:b AS uuid)"),
            {"b": msg.batch_id},
        ).scalar_one()
    assert deliveries == 0  # not started: the ledger is untouched
    assert {s for s, _, _ in _items(db_url).values()} == {"pending"}


def _sent(st: WorkerState) -> list[BatchMessage]:
    """The batch messages waiting on the task's queue, oldest first (the kwargs of
    each Celery message, as the Redis transport stores it)."""
    raw = _broker(st).lrange(keys.task_queue(TASK), 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in reversed(raw)]
    return [BatchMessage.decode(kwargs) for _args, kwargs, _embed in bodies]


def _died_on(url: str, msg: BatchMessage) -> None:
    """A worker started `msg` and died before finishing it."""
    with transaction(url) as session:
        assert ledger.start_batch(
            session, batch_id=msg.batch_id, item_ids=msg.item_ids, worker="t@gone", lease_seconds=5
        )


def test_a_message_a_worker_died_on_is_split_and_its_parts_sent(make_worker, db_url):
    st = make_worker()
    msg = _claim(db_url, conversations(3))
    _died_on(db_url, msg)

    outcome = _run(st, msg)

    assert outcome.kind is BatchKind.SPLIT
    assert (outcome.items, outcome.suspects, len(outcome.parts)) == (3, 3, 3)
    assert msg.batch_id not in outcome.parts
    sent = _sent(st)
    assert sorted(m.batch_id for m in sent) == sorted(outcome.parts)
    assert sorted(i for m in sent for i in m.item_ids) == sorted(msg.item_ids)
    assert {len(m.item_ids) for m in sent} == {1}  # each suspect alone

    # Each suspect then runs alone, once its part's message comes.
    lone = _run(st, sent[0])
    assert lone.kind is BatchKind.DONE and (lone.items, lone.done) == (1, 1)


def test_an_item_that_kills_workers_alone_too_is_marked_dead(make_worker, db_url):
    st = make_worker(poison_crashes=1)
    msg = _claim(db_url, conversations(2))
    _died_on(db_url, msg)
    split = _run(st, msg)
    assert split.kind is BatchKind.SPLIT
    lone = _sent(st)[0]
    _died_on(db_url, lone)  # it killed the worker again, alone

    outcome = _run(st, lone)

    assert outcome.kind is BatchKind.DEAD and outcome.dead == tuple(lone.item_ids)
    assert outcome.summary() == {"batch": lone.batch_id, "dead": list(lone.item_ids)}
    counts = status_counts(db_url, TASK)
    assert counts.get("dead") == 1
    dead = [e for s, e, _ in _items(db_url).values() if s == "dead"]
    assert len(dead) == 1 and dead[0] is not None and "isolated as poison" in dead[0]


def test_a_message_for_another_task_is_refused(make_worker, db_url):
    st = make_worker()
    with pytest.raises(ValueError, match="this worker serves 't'"):
        _run(st, BatchMessage("other", "00000000-0000-0000-0000-000000000000", [1]))


def test_a_batch_of_several_pipeline_chunks_takes_each_up_and_finishes_all(make_worker, db_url):
    """Over PIPELINE_CHUNK items the batch runs as a pipeline of chunks, started
    chunk by chunk: the outcome counts every chunk, and the last write closes it."""
    st = make_worker()
    n = PIPELINE_CHUNK + 40
    assert len(chunk_plan(n)) == 2
    msg = _claim(db_url, conversations(n))
    outcome = _run(st, msg)

    assert outcome.kind is BatchKind.DONE
    assert (outcome.items, outcome.done, outcome.failed, outcome.skipped) == (n, n, 0, 0)
    assert status_counts(db_url, TASK) == {"done": n}
    with transaction(db_url) as session:
        workers = (
            session.execute(
                text("SELECT DISTINCT worker FROM work_items WHERE task = :t"), {"t": TASK}
            )
            .scalars()
            .all()
        )
        open_batches = session.execute(text("SELECT count(*) FROM batches")).scalar_one()
    assert workers == [HOST] and open_batches == 0
