"""The bulk paths of the ledger and the producer on the real Postgres and Redis:
size-ordered claims, the JSON results upsert and pipelined sending."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator

import pytest
import redis
from kombu import pools
from sqlalchemy import text

from db import ledger
from db.engine import transaction
from db.sources import ingest_conversations
from tests.support import conversations
from wire.messages import BatchMessage, send_batches


@pytest.fixture
def fresh_pools() -> Iterator[None]:
    """kombu keeps producer pools per broker URL for the whole process; a pool
    another test closed would be handed to this test's app. Start and end clean."""
    pools.reset()
    yield
    pools.reset()  # closes this test's broker connections


def _seed(url: str, n: int) -> None:
    with transaction(url) as s:
        ingest_conversations(s, conversations(n))
    with transaction(url) as s:
        ledger.discover(s, task="intent", source_kind="conversation")


def _sizes(url: str) -> dict[int, int]:
    with transaction(url) as s:
        return dict(s.execute(text("SELECT id, size_hint FROM work_items")).tuples().all())


def _claim_and_start(url: str, n: int) -> ledger.ClaimedBatch:
    with transaction(url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=60)
    with transaction(url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
    return batch


def test_claims_follow_size_order_across_and_within_claims(db_url):
    _seed(db_url, 200)
    size = _sizes(db_url)
    claimed: list[ledger.ClaimedBatch] = []
    for _ in range(3):  # the first claims take the smallest items, in batches of neighbours
        with transaction(db_url) as s:
            claimed += ledger.claim_batches(
                s, task="intent", limit=50, batch_size=16, lease_seconds=60
            )
    assert [len(b.item_ids) for b in claimed] == [16, 16, 16, 2] * 3
    spans = [(min(size[i] for i in b.item_ids), max(size[i] for i in b.item_ids)) for b in claimed]
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:], strict=False))
    taken = {i for b in claimed for i in b.item_ids}
    assert max(size[i] for i in taken) <= min(size[i] for i in set(size) - taken)
    assert all(list(b.item_ids) == sorted(b.item_ids) for b in claimed)
    assert len({b.batch_id for b in claimed}) == len(claimed)
    with transaction(db_url) as s:
        # A claim writes one batches row per batch and nothing per item.
        rows = s.execute(
            text(
                "SELECT CAST(batch_id AS text), item_ids, n_items, lease_until > now() FROM batches"
            )
        ).all()
        assert set(s.execute(text("SELECT DISTINCT status FROM work_items")).scalars()) == {
            "pending"
        }
    assert sorted(rows) == sorted(
        (b.batch_id, list(b.item_ids), len(b.item_ids), True) for b in claimed
    )


def test_finish_batch_stores_every_value_exactly(db_url):
    _seed(db_url, 6)
    batch = _claim_and_start(db_url, 6)
    a, b, c, d, e, f = batch.item_ids
    base = {"model_name": "m\u00e9", "model_tier": 1, "device": "cuda:0", "latency_ms": 2.5}
    outcomes = [
        ledger.Outcome(a, {**base, "label": 'quo"te\\', "confidence": 1e-7,
                           "scores": {"x": 0.25, "y\u00fc": 0.75}, "output": None}),
        ledger.Outcome(b, {**base, "label": None, "confidence": None, "scores": None,
                           "output": {"transcript": "it's \u2019ok\u2019\n", "chunks": 3,
                                      "nested": [1, None, {"k": "v"}]}}),
        ledger.Outcome(c, {**base, "label": "x", "confidence": math.nan, "scores": {},
                           "output": None, "latency_ms": math.inf}),
        # An LLM's invalid output: the item fails and its raw output is kept.
        ledger.Outcome(d, {**base, "label": None, "confidence": None, "scores": None,
                           "output": {"raw": "{not json"}}, "invalid_output: no JSON"),
        ledger.Outcome(e, None, "corrupt audio"),
        ledger.Outcome(f, {**base, "label": "y", "confidence": 0.5, "scores": None,
                           "output": None}),
    ]  # fmt: skip
    with transaction(db_url) as s:
        counts = ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)
    assert (counts.done, counts.failed, counts.skipped) == (4, 2, 0)
    with transaction(db_url) as s:
        rows = {
            r[0]: r[1:]
            for r in s.execute(
                text(
                    "SELECT work_item_id, label, confidence, scores, output, model_name,"
                    " model_tier, device, latency_ms FROM results"
                )
            )
        }
        states = dict(
            s.execute(text("SELECT id, status || ':' || coalesce(last_error, '') FROM work_items"))
            .tuples()
            .all()
        )
    meta = ("m\u00e9", 1, "cuda:0")
    assert rows[a] == ('quo"te\\', 1e-7, {"x": 0.25, "y\u00fc": 0.75}, None, *meta, 2.5)
    assert rows[b] == (None, None, None, outcomes[1].result.output, *meta, 2.5)  # type: ignore[union-attr]
    assert (
        rows[c][0] == "x" and math.isnan(rows[c][1]) and rows[c][2:] == ({}, None, *meta, math.inf)
    )
    assert rows[d] == (None, None, None, {"raw": "{not json"}, *meta, 2.5)
    assert e not in rows
    assert rows[f] == ("y", 0.5, None, None, *meta, 2.5)
    assert states == {
        a: "done:", b: "done:", c: "done:", d: "failed:invalid_output: no JSON",
        e: "failed:corrupt audio", f: "done:",
    }  # fmt: skip


def test_nan_inside_scores_is_refused_with_the_item_named(db_url):
    _seed(db_url, 2)
    batch = _claim_and_start(db_url, 2)
    good, bad = batch.item_ids
    row = {"label": "x", "confidence": 0.5, "scores": {"x": 0.5}, "output": None,
           "model_name": "m", "model_tier": 0, "device": "cpu", "latency_ms": 1.0}  # fmt: skip
    outcomes = [
        ledger.Outcome(good, row),
        ledger.Outcome(bad, {**row, "scores": {"x": math.nan}}),
    ]
    with pytest.raises(ValueError, match=f"work item {bad}: .*NaN or infinity"):
        with transaction(db_url) as s:
            ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)
    with transaction(db_url) as s:  # rolled back: both still running, no result
        assert s.execute(text("SELECT count(*) FROM results")).scalar_one() == 0
        assert ledger.counts(s, task="intent") == {"intent": {"running": 2}}


def test_finish_batch_replaces_the_result_of_an_earlier_attempt(db_url):
    _seed(db_url, 3)
    first = _claim_and_start(db_url, 3)
    row = {"label": "old", "confidence": 0.1, "scores": None, "output": {"v": 1},
           "model_name": "m", "model_tier": 0, "device": "cpu", "latency_ms": 1.0}  # fmt: skip
    with transaction(db_url) as s:
        ledger.finish_batch(
            s,
            batch_id=first.batch_id,
            outcomes=[ledger.Outcome(i, row, "invalid output") for i in first.item_ids],
        )
        assert ledger.retry(s, statuses=["failed"], task="intent") == 3
    second = _claim_and_start(db_url, 3)
    skipped = first.item_ids[0]  # this one ran out of time: no outcome this attempt
    new = {**row, "label": "new", "output": None}
    with transaction(db_url) as s:
        counts = ledger.finish_batch(
            s,
            batch_id=second.batch_id,
            outcomes=[ledger.Outcome(i, new) for i in second.item_ids if i != skipped],
        )
        # A stale finish of the first attempt changes nothing any more.
        stale = ledger.finish_batch(
            s, batch_id=first.batch_id, outcomes=[ledger.Outcome(skipped, new)]
        )
    assert (counts.done, counts.failed, stale.skipped) == (2, 0, 1)
    with transaction(db_url) as s:
        got = dict(
            s.execute(text("SELECT work_item_id, label FROM results ORDER BY 1")).tuples().all()
        )
    assert got == {skipped: "old", **{i: "new" for i in second.item_ids if i != skipped}}


def test_send_batches_pipelines_every_message_in_order(broker_url, fresh_pools):
    from config.settings import Settings
    from wire.app import create_app

    app = create_app(Settings(database_url="postgresql://unused/x", broker_url=broker_url))
    msgs = [
        BatchMessage("intent", f"b{k:04d}", tuple(range(k * 64, k * 64 + 64))) for k in range(700)
    ]
    seen: list[int] = []
    assert send_batches(app, msgs, progress=seen.append) == 700
    assert seen == [64] * 700
    client = redis.Redis.from_url(broker_url)
    try:
        assert client.llen("fleet.intent") == 700
        # Workers pop from the right: the first batch sent is taken first.
        first = json.loads(client.lindex("fleet.intent", -1))  # type: ignore[arg-type]
        last = json.loads(client.lindex("fleet.intent", 0))  # type: ignore[arg-type]
    finally:
        client.close()
    args, kwargs, _ = json.loads(base64.b64decode(first["body"]))
    assert args == [] and kwargs == msgs[0].encode()
    assert first["headers"]["task"] == "fleet.run_batch"
    assert first["headers"]["kwargsrepr"] == (
        "{'task': 'intent', 'batch_id': 'b0000', 'item_ids': [0, ..., 63] (64 items), 'attempt': 0}"
    )
    assert json.loads(base64.b64decode(last["body"]))[1]["batch_id"] == "b0699"
    assert BatchMessage.decode(kwargs) == msgs[0]


def test_enqueue_sends_every_batch_and_refreshes_statistics_after_a_large_claim(
    db_url, broker_url, monkeypatch, fresh_pools
):
    from config.settings import Settings
    from config.taskconfig import get_task, load_tasks
    from producer import enqueue as producer_enqueue
    from wire.app import create_app

    with transaction(db_url) as s:
        ingest_conversations(s, conversations(300))
    monkeypatch.setattr(producer_enqueue, "CLAIM_CHUNK", 100)  # several claim chunks
    monkeypatch.setattr(producer_enqueue, "ANALYZE_AFTER", 250)
    app = create_app(Settings(database_url=db_url, broker_url=broker_url))
    spec = get_task(load_tasks(), "intent")
    sent: list[int] = []
    report = producer_enqueue.enqueue(
        db_url, app, spec, limit=None, batch_size=16, lease_seconds=60, progress=sent.append
    )
    # Claims take whole batches (96 of each 100): 6 + 6 + 6 + 1 batches.
    assert (report.discovered, report.items, report.batches) == (300, 300, 19)
    assert sum(sent) == 300
    client = redis.Redis.from_url(broker_url)
    try:
        bodies = [json.loads(base64.b64decode(json.loads(m)["body"]))[1]
                  for m in client.lrange("fleet.intent", 0, -1)]  # fmt: skip
    finally:
        client.close()
    assert sorted(i for b in bodies for i in b["item_ids"]) == sorted(_sizes(db_url))
    with transaction(db_url) as s:
        assert ledger.counts(s, task="intent") == {"intent": {"queued": 300}}
        s.execute(text("SELECT pg_stat_clear_snapshot()"))
        analyzed = s.execute(
            text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'work_items'")
        ).scalar_one()
    assert analyzed is not None
