"""The work ledger on the real Postgres."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import text

from db import ledger
from db.engine import transaction
from db.sources import ingest_conversations
from tests.support import conversations


def _seed(url: str, n: int) -> None:
    with transaction(url) as s:
        ingest_conversations(s, conversations(n))
    with transaction(url) as s:
        assert ledger.discover(s, task="intent", source_kind="conversation") == n


def test_discover_is_idempotent(db_url):
    _seed(db_url, 10)
    with transaction(db_url) as s:
        assert ledger.discover(s, task="intent", source_kind="conversation") == 0
        assert ledger.discover(s, task="other", source_kind="conversation") == 10


def test_concurrent_claims_never_overlap(db_url):
    _seed(db_url, 3000)
    claimed: list[list[int]] = [[], [], [], []]
    barrier = threading.Barrier(4)

    def producer(k: int) -> None:
        barrier.wait()
        while True:
            with transaction(db_url) as s:
                batches = ledger.claim_batches(
                    s, task="intent", limit=97, batch_size=16, lease_seconds=60
                )
                time.sleep(0.01)  # hold the row locks a moment: overlap would show
            if not batches:
                return
            for b in batches:
                claimed[k].extend(b.item_ids)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for part in claimed for i in part]
    assert len(every) == len(set(every)) == 3000
    assert sum(1 for part in claimed if part) >= 2  # they really ran side by side


def _row_versions(url: str) -> dict[int, str]:
    """Each item row's xmin: it changes whenever the row is written."""
    with transaction(url) as s:
        return dict(s.execute(text("SELECT id, xmin::text FROM work_items")).tuples().all())


def test_claim_cuts_batches_and_writes_nothing_per_item(db_url):
    _seed(db_url, 70)
    before = _row_versions(db_url)
    with transaction(db_url) as s:
        batches = ledger.claim_batches(s, task="intent", limit=70, batch_size=32, lease_seconds=60)
    assert sorted(len(b.item_ids) for b in batches) == [6, 32, 32]
    assert _row_versions(db_url) == before
    with transaction(db_url) as s:
        assert s.execute(text("SELECT count(*) FROM work_queue")).scalar_one() == 0
        assert ledger.counts(s) == {"intent": {"queued": 70}}
        assert ledger.claimable(s, task="intent", source_kind="conversation") == (0, 0)


def test_a_claim_puts_back_what_it_does_not_take_and_a_start_writes_no_item(db_url):
    _seed(db_url, 500)  # three buckets: a claim of 250 takes two and a part of the third
    before = _row_versions(db_url)
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(
            s, task="intent", limit=250, batch_size=250, lease_seconds=60
        )
        assert ledger.claimable(s, task="intent", source_kind="conversation") == (250, 0)
    with transaction(db_url) as s:
        started = ledger.start_batch(
            s,
            batch_id=batch.batch_id,
            item_ids=batch.item_ids,
            worker="w",
            lease_seconds=60,
            by_chunk=True,
        )
        assert len(started) == 250
        assert ledger.start_chunk(
            s,
            batch_id=batch.batch_id,
            item_ids=batch.item_ids[:100],
            worker="w",
            lease_seconds=60,
        ) == set(batch.item_ids[:100])
        assert ledger.extend_lease(s, batch_id=batch.batch_id, lease_seconds=60, worker="w") == 1
        assert ledger.extend_lease(s, batch_id=batch.batch_id, lease_seconds=60, worker="x") == 0
        assert ledger.counts(s) == {"intent": {"pending": 250, "running": 250}}
    assert _row_versions(db_url) == before
    with transaction(db_url) as s:
        rest = ledger.claim_batches(s, task="intent", limit=500, batch_size=500, lease_seconds=60)
    assert sorted(rest[0].item_ids + batch.item_ids) == sorted(before)


def test_the_finish_is_a_heap_only_update(db_url):
    """Nothing the finish writes is indexed: each item's row gets a heap-only
    update, on its own page (fillfactor 85 leaves room for a few new versions
    per page; later ones need the page pruned of the old versions, which
    Postgres does once no transaction in the cluster is older than them)."""
    _seed(db_url, 50)  # one page
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=50, batch_size=50, lease_seconds=60)
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
    stats = text(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'work_items'"
    )
    with transaction(db_url) as s:
        u0, h0 = s.execute(stats).one()
        got = ledger.finish_batch(
            s, batch_id=batch.batch_id, outcomes=_outcomes(batch.item_ids[:5])
        )
        u, h = s.execute(stats).one()
    assert got.done == u - u0 == h - h0 == 5
    with transaction(db_url) as s:  # the last chunk closes the batch
        done = ledger.finish_batch(
            s, batch_id=batch.batch_id, outcomes=_outcomes(batch.item_ids[5:]), last=True
        ).done
        assert done == 45 and s.execute(text("SELECT count(*) FROM batches")).scalar_one() == 0
        assert ledger.counts(s) == {"intent": {"done": 50}}


def _run_one(url: str, outcomes_for) -> tuple[ledger.ClaimedBatch, list[ledger.StartedItem]]:
    with transaction(url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=5, batch_size=5, lease_seconds=60)
    with transaction(url) as s:
        started = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
    return batch, started


def _outcomes(ids, *, fail=()):
    row = {
        "label": "x",
        "confidence": 0.9,
        "scores": {"x": 0.9},
        "output": None,
        "model_name": "m",
        "model_tier": 0,
        "device": "cpu",
        "latency_ms": 1.0,
    }
    return [ledger.Outcome(i, row, "bad input" if i in fail else None) for i in ids]


def test_finish_batch_twice_keeps_one_result(db_url):
    _seed(db_url, 5)
    batch, started = _run_one(db_url, None)
    assert [s.deliveries_before for s in started] == [0] * 5
    ids = batch.item_ids
    with transaction(db_url) as s:
        first = ledger.finish_batch(
            s, batch_id=batch.batch_id, outcomes=_outcomes(ids, fail={ids[0]})
        )
    with transaction(db_url) as s:
        second = ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=_outcomes(ids))
    assert (first.done, first.failed, first.skipped) == (4, 1, 0)
    assert (second.done, second.failed, second.skipped) == (0, 0, 5)
    with transaction(db_url) as s:
        assert s.execute(text("SELECT count(*) FROM results")).scalar_one() == 5
        assert s.execute(text("SELECT count(DISTINCT work_item_id) FROM results")).scalar_one() == 5
        err = s.execute(
            text("SELECT last_error FROM work_items WHERE status = 'failed'")
        ).scalar_one()
    assert err == "bad input"


def test_finish_batch_keeps_each_rows_model_when_a_batch_spans_tiers(db_url):
    """The model columns travel once per model (each row names its model by
    number): rows of one batch run on two tiers (an out-of-memory step down
    mid-batch), one without a revision, keep their own model."""
    _seed(db_url, 5)
    batch, _ = _run_one(db_url, None)
    ids = batch.item_ids
    big = {"model_name": "big", "model_revision": "sha256:aa", "model_tier": 0, "device": "cuda:0"}
    small = {"model_name": "small", "model_tier": 1, "device": "cuda:0"}  # no revision key
    outcomes = [
        ledger.Outcome(
            i,
            {
                **(big if k < 2 else small),
                "label": f"l{k}",
                "confidence": 0.5 + k / 10,
                "scores": {f"l{k}": 1.0},
                "output": {"k": k} if k == 4 else None,
                "latency_ms": float(k),
            },
            "raw output kept" if k == 3 else None,
        )
        for k, i in enumerate(ids)
    ]
    with transaction(db_url) as s:
        got = ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)
        rows = s.execute(
            text(
                "SELECT work_item_id, label, confidence, scores, output, model_name, "
                "model_revision, model_tier, device, latency_ms FROM results ORDER BY work_item_id"
            )
        ).all()
    assert (got.done, got.failed) == (4, 1)
    assert [tuple(r) for r in rows] == [
        (ids[0], "l0", 0.5, {"l0": 1.0}, None, "big", "sha256:aa", 0, "cuda:0", 0.0),
        (ids[1], "l1", 0.6, {"l1": 1.0}, None, "big", "sha256:aa", 0, "cuda:0", 1.0),
        (ids[2], "l2", 0.7, {"l2": 1.0}, None, "small", None, 1, "cuda:0", 2.0),
        (ids[3], "l3", 0.8, {"l3": 1.0}, None, "small", None, 1, "cuda:0", 3.0),
        (ids[4], "l4", 0.9, {"l4": 1.0}, {"k": 4}, "small", None, 1, "cuda:0", 4.0),
    ]


def test_redelivered_batch_is_skipped_and_stale_batch_cannot_finish(db_url):
    _seed(db_url, 5)
    batch, _ = _run_one(db_url, None)
    with transaction(db_url) as s:
        ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=_outcomes(batch.item_ids))
    with transaction(db_url) as s:  # the same message again
        assert (
            ledger.start_batch(
                s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
            )
            == []
        )


def _expire_leases(s) -> None:
    s.execute(text("UPDATE batches SET lease_until = now() - interval '1 second'"))


def test_reconcile_returns_expired_leases_then_kills_after_attempts(db_url):
    _seed(db_url, 5)
    _run_one(db_url, None)  # claimed and started: then the worker is lost
    with transaction(db_url) as s:
        _expire_leases(s)
    with transaction(db_url) as s:
        assert ledger.reconcile(s, max_attempts=2) == {"returned": 5, "dead": 0}
    _run_one(db_url, None)
    with transaction(db_url) as s:
        _expire_leases(s)
    with transaction(db_url) as s:
        assert ledger.reconcile(s, max_attempts=2) == {"returned": 0, "dead": 5}
        assert ledger.counts(s) == {"intent": {"dead": 5}}
        (reason,) = set(s.execute(text("SELECT last_error FROM work_items")).scalars())
        assert "started by a worker 2 times" in reason
        assert ledger.retry(s, statuses=["dead"]) == 5
        assert ledger.counts(s) == {"intent": {"pending": 5}}


def test_reconcile_never_counts_a_claim_no_worker_took(db_url):
    """Queued items whose lease expired were never started (workers down or
    busy, the message lost with Redis): not their fault, never dead for it."""
    _seed(db_url, 5)
    for _ in range(4):
        with transaction(db_url) as s:
            ledger.claim_batches(s, task="intent", limit=5, batch_size=5, lease_seconds=60)
            _expire_leases(s)
        with transaction(db_url) as s:
            assert ledger.reconcile(s, max_attempts=2) == {"returned": 5, "dead": 0}
    with transaction(db_url) as s:
        assert set(s.execute(text("SELECT attempts FROM work_items")).scalars()) == {0}


def test_stale_batch_after_reclaim_changes_nothing(db_url):
    _seed(db_url, 5)
    old, _ = _run_one(db_url, None)
    with transaction(db_url) as s:  # lease expired, reclaimed into a new batch
        _expire_leases(s)
        ledger.reconcile(s, max_attempts=5)
    new, _ = _run_one(db_url, None)
    with transaction(db_url) as s:
        stale = ledger.finish_batch(s, batch_id=old.batch_id, outcomes=_outcomes(old.item_ids))
    assert stale.done == 0 and stale.skipped == 5
    with transaction(db_url) as s:
        fresh = ledger.finish_batch(s, batch_id=new.batch_id, outcomes=_outcomes(new.item_ids))
    assert fresh.done == 5


def test_split_and_mark_dead(db_url):
    _seed(db_url, 6)
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=6, batch_size=6, lease_seconds=60)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
    with transaction(db_url) as s:  # delivered again: deliveries_before = 1
        again = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
    assert {a.deliveries_before for a in again} == {1}
    with transaction(db_url) as s:
        parts = ledger.split_batch(
            s,
            batch_id=batch.batch_id,
            parts=[batch.item_ids[:3], batch.item_ids[3:]],
            lease_seconds=60,
            reset_deliveries=True,
        )
    assert [len(p.item_ids) for p in parts] == [3, 3]
    with transaction(db_url) as s:
        started = ledger.start_batch(
            s, batch_id=parts[0].batch_id, item_ids=parts[0].item_ids, worker="w", lease_seconds=60
        )
        assert {x.deliveries_before for x in started} == {0}
        assert (
            ledger.mark_dead(
                s, batch_id=parts[0].batch_id, item_ids=parts[0].item_ids[:1], reason="poison"
            )
            == 1
        )
        # The dead mark closed its batch: its other two items are queued again.
        assert ledger.counts(s)["intent"] == {"dead": 1, "queued": 3, "pending": 2}


def test_a_death_is_counted_once_on_the_items(db_url):
    """Deliveries count worker deaths: the start that found one and split the
    batch counts it, and the parts' first starts count nothing more."""
    _seed(db_url, 4)
    batch, _ = _run_one(db_url, None)  # started, then the worker died
    with transaction(db_url) as s:
        again = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        assert {a.deliveries_before for a in again} == {1}
        parts = ledger.split_batch(
            s,
            batch_id=batch.batch_id,
            parts=[(i,) for i in batch.item_ids],
            lease_seconds=60,
            reset_deliveries=False,
        )
    assert [len(p.item_ids) for p in parts] == [1, 1, 1, 1]
    with transaction(db_url) as s:
        alone = ledger.start_batch(
            s, batch_id=parts[0].batch_id, item_ids=parts[0].item_ids, worker="w", lease_seconds=60
        )
    assert [a.deliveries_before for a in alone] == [1]


def test_a_resumed_start_replaces_the_start_a_transient_error_ended(db_url):
    """A worker that lived through a transient error is no crash: the retry's
    start takes the place of the first one; a crash after it counts again."""
    _seed(db_url, 3)
    batch, first = _run_one(db_url, None)  # started; then Postgres went away, the worker lived
    assert {a.deliveries_before for a in first} == {0}

    def start(resume: bool) -> list[ledger.StartedItem]:
        with transaction(db_url) as s:
            return ledger.start_batch(
                s,
                batch_id=batch.batch_id,
                item_ids=batch.item_ids,
                worker="w",
                lease_seconds=60,
                resume=resume,
            )

    assert {a.deliveries_before for a in start(resume=True)} == {0}  # no crash so far
    assert {a.deliveries_before for a in start(resume=False)} == {1}  # that start died
    with transaction(db_url) as s:  # one death counted; starts are counted on the batch
        got = s.execute(
            text("SELECT DISTINCT deliveries FROM work_items WHERE id = ANY(:ids)"),
            {"ids": list(batch.item_ids)},
        ).scalars()
        assert list(got) == [1]
        assert (
            s.execute(
                text("SELECT deliveries FROM batches WHERE batch_id = CAST(:b AS uuid)"),
                {"b": batch.batch_id},
            ).scalar_one()
            == 3
        )


def _one_batch(url: str, n: int) -> tuple[ledger.ClaimedBatch, list[int]]:
    """n fresh items claimed as one batch (60 s lease): the batch and its ids."""
    _seed(url, n)
    with transaction(url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=60)
    return batch, list(batch.item_ids)


def test_a_batch_started_by_chunk_makes_suspects_only_of_chunks_taken_up(db_url):
    """A large batch's start takes no chunk up; each chunk is taken up (the
    batch row's started_upto) as the worker reaches it. A worker that dies
    after taking up the first chunk leaves only that chunk's items suspect:
    the next start counts the death on those, and a split runs them alone."""
    batch, ids = _one_batch(db_url, 8)

    def items() -> dict[int, tuple[str, int]]:
        with transaction(db_url) as s:
            return {
                i: (st, d)
                for i, st, d in s.execute(
                    text("SELECT id, status, deliveries FROM work_items WHERE id = ANY(:ids)"),
                    {"ids": ids},
                ).all()
            }

    with transaction(db_url) as s:
        started = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=ids, worker="w", lease_seconds=60, by_chunk=True
        )
        assert [x.item_id for x in started] == ids
        assert {x.deliveries_before for x in started} == {0}
    with transaction(db_url) as s:
        assert ledger.start_chunk(
            s, batch_id=batch.batch_id, item_ids=ids[:3], worker="w", lease_seconds=60
        ) == set(ids[:3])
        # another batch's chunk is not taken up
        assert not ledger.start_chunk(
            s, batch_id=str(uuid.uuid4()), item_ids=ids[3:], worker="w", lease_seconds=60
        )
        assert s.execute(
            text("SELECT started_upto, worker FROM batches WHERE batch_id = CAST(:b AS uuid)"),
            {"b": batch.batch_id},
        ).one() == (ids[2], "w")
    assert set(items().values()) == {("pending", 0)}  # nothing written per item
    # The worker died; the message is delivered again.
    with transaction(db_url) as s:
        again = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=ids, worker="w2", lease_seconds=60, by_chunk=True
        )
    before = {a.item_id: a.deliveries_before for a in again}
    assert [i for i in ids if before[i] > 0] == ids[:3]
    with transaction(db_url) as s:
        parts = ledger.split_batch(
            s,
            batch_id=batch.batch_id,
            parts=[tuple(ids[3:]), *((i,) for i in ids[:3])],
            lease_seconds=60,
            reset_deliveries=False,
        )
    assert [len(p.item_ids) for p in parts] == [5, 1, 1, 1]
    assert items() == {i: ("pending", 1 if i in ids[:3] else 0) for i in ids}
    with transaction(db_url) as s:
        assert ledger.counts(s) == {"intent": {"queued": 8}}


def test_a_worker_death_found_by_the_reconciler_counts_only_chunks_taken_up(db_url):
    batch, ids = _one_batch(db_url, 6)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=ids, worker="w", lease_seconds=60, by_chunk=True
        )
        ledger.start_chunk(
            s, batch_id=batch.batch_id, item_ids=ids[:2], worker="w", lease_seconds=60
        )
        _expire_leases(s)
    with transaction(db_url) as s:
        assert ledger.reconcile(s, max_attempts=5) == {"returned": 6, "dead": 0}
        got = dict(
            s.execute(
                text("SELECT id, attempts * 10 + deliveries FROM work_items"),
            )
            .tuples()
            .all()
        )
    assert {i: got[i] for i in ids} == {i: (11 if i in ids[:2] else 0) for i in ids}


def test_a_late_finish_after_the_lease_expired_changes_nothing(db_url):
    """The worker outlived its lease: the reconciler closed the batch and queued
    its items again; its finish then writes nothing, and the new claim's run
    writes the one result each item has."""
    _seed(db_url, 5)
    old, _ = _run_one(db_url, None)
    with transaction(db_url) as s:
        _expire_leases(s)
        assert ledger.reconcile(s, max_attempts=5) == {"returned": 5, "dead": 0}
    with transaction(db_url) as s:
        late = ledger.finish_batch(
            s, batch_id=old.batch_id, outcomes=_outcomes(old.item_ids), last=True
        )
        assert (late.done, late.skipped) == (0, 5)
        assert s.execute(text("SELECT count(*) FROM results")).scalar_one() == 0
    new, started = _run_one(db_url, None)
    assert sorted(new.item_ids) == sorted(old.item_ids) and len(started) == 5
    with transaction(db_url) as s:
        assert (
            ledger.finish_batch(
                s, batch_id=new.batch_id, outcomes=_outcomes(new.item_ids), last=True
            ).done
            == 5
        )
        assert s.execute(
            text("SELECT count(*), count(DISTINCT work_item_id) FROM results")
        ).one() == (5, 5)


def test_a_requeue_while_the_batch_is_in_flight_wins(db_url):
    """A reset (db.history: the source changed, `fleet rerun`) of an item whose
    batch is running: the batch's finish skips it, the item is queued again,
    once, and a new claim runs it."""
    from db import history

    batch, ids = _one_batch(db_url, 4)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=ids, worker="w", lease_seconds=60, by_chunk=True
        )
        ledger.start_chunk(s, batch_id=batch.batch_id, item_ids=ids, worker="w", lease_seconds=60)
    with transaction(db_url) as s:
        assert history.reset_items(s, item_ids=[ids[0]], reason="content_changed") == 1
    with transaction(db_url) as s:  # an item a bucket holds is not queued twice
        assert history.reset_items(s, item_ids=[ids[0]], reason="content_changed") == 1
        assert ledger.claimable(s, task="intent", source_kind="conversation") == (1, 0)
    with transaction(db_url) as s:
        got = ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=_outcomes(ids), last=True)
    assert (got.done, got.skipped) == (3, 1)
    with transaction(db_url) as s:
        (again,) = ledger.claim_batches(s, task="intent", limit=9, batch_size=9, lease_seconds=60)
    assert again.item_ids == (ids[0],)
    with transaction(db_url) as s:
        started = ledger.start_batch(
            s, batch_id=again.batch_id, item_ids=again.item_ids, worker="w", lease_seconds=60
        )
        assert [x.item_id for x in started] == [ids[0]]
        assert (
            ledger.finish_batch(
                s, batch_id=again.batch_id, outcomes=_outcomes(again.item_ids), last=True
            ).done
            == 1
        )
        assert ledger.counts(s) == {"intent": {"done": 4}}


def test_an_item_gone_while_it_waits_leaves_its_bucket(db_url):
    from db import history

    _seed(db_url, 5)
    with transaction(db_url) as s:
        ids = sorted(s.execute(text("SELECT id FROM work_items")).scalars())
        assert history.mark_gone(s, item_ids=ids[:2], why="deleted at the source") == 2
        assert ledger.claimable(s, task="intent", source_kind="conversation") == (3, 0)
        (batch,) = ledger.claim_batches(s, task="intent", limit=9, batch_size=9, lease_seconds=60)
        assert batch.item_ids == tuple(ids[2:])
        assert ledger.counts(s) == {"intent": {"gone": 2, "queued": 3}}
