"""Migration 0012 (work_queue buckets and batches rows) forward and back on a
drained database holding items in every state."""

from __future__ import annotations

from sqlalchemy import text

from db import ledger
from db.engine import transaction
from db.migrate import downgrade, upgrade
from tests.support import create_database, drop_database

STATES = ["pending", "pending", "queued", "running", "done", "failed", "dead", "gone", "parked"]
OLD_INDEXES = {"ix_work_items_claim", "ix_work_items_lease", "ix_work_items_batch"}


def _seed_old(url: str) -> dict[str, list[int]]:
    """Items in every state as the ledger before 0012 left them (a worker died
    holding the running one; the queued one's message waits in Redis)."""
    by_state: dict[str, list[int]] = {}
    with transaction(url) as s:
        for k, state in enumerate(STATES):
            sid = s.execute(
                text(
                    "INSERT INTO conversations (external_id, messages) "
                    "VALUES (:e, '[]'::jsonb) RETURNING id"
                ),
                {"e": f"c{k}"},
            ).scalar_one()
            in_flight = state in ("queued", "running")
            item = s.execute(
                text(
                    """
                    INSERT INTO work_items (source_kind, source_id, task, status, size_hint,
                                            attempts, deliveries, batch_id, lease_until, worker,
                                            last_error)
                    VALUES ('conversation', :sid, 'intent', :st, :size, :att, :dl,
                            CAST(:b AS uuid), now() + CAST(:lease AS interval), :w, :err)
                    RETURNING id
                    """
                ),
                {
                    "sid": sid,
                    "st": state,
                    "size": 100 - k,
                    "att": 1 if in_flight else 0,
                    "dl": 1 if state == "running" else 0,
                    "b": "00000000-0000-0000-0000-000000000001" if in_flight else None,
                    "lease": "1 hour" if in_flight else None,
                    "w": "w" if state == "running" else None,
                    "err": "why" if state in ("failed", "dead", "parked") else None,
                },
            ).scalar_one()
            by_state.setdefault(state, []).append(item)
        s.execute(
            text(
                "INSERT INTO results (work_item_id, label, model_name, model_tier, device, "
                "latency_ms) VALUES (:i, 'x', 'm', 0, 'cpu', 1)"
            ),
            {"i": by_state["done"][0]},
        )
    return by_state


def _indexes(url: str) -> set[str]:
    with transaction(url) as s:
        return set(
            s.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename = 'work_items'")
            ).scalars()
        )


def _statuses(url: str) -> dict[int, tuple[str, int, int]]:
    with transaction(url) as s:
        return {
            i: (st, a, d)
            for i, st, a, d in s.execute(
                text("SELECT id, status, attempts, deliveries FROM work_items")
            ).all()
        }


def test_upgrade_and_downgrade_with_items_in_every_state():
    name, url = create_database()
    try:
        upgrade(url, "0010")
        by_state = _seed_old(url)
        open_ids = by_state["pending"] + by_state["queued"] + by_state["running"]

        upgrade(url)
        assert not OLD_INDEXES & _indexes(url)
        now = _statuses(url)
        # In flight goes back to pending, its counts kept (the dead worker's item
        # stays a suspect); the rest keep their state.
        assert {i: now[i][0] for i in open_ids} == dict.fromkeys(open_ids, "pending")
        assert now[by_state["running"][0]] == ("pending", 1, 1)
        assert [now[by_state[st][0]][0] for st in STATES[4:]] == STATES[4:]
        with transaction(url) as s:
            queued = s.execute(text("SELECT item_ids FROM work_queue")).scalars().all()
            # one bucket, in size order (size_hint falls with k)
            assert queued == [sorted(open_ids, key=lambda i: -i)]
            options = s.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'work_items'")
            ).scalar_one()
            assert options == ["fillfactor=85"]
            assert ledger.counts(s)["intent"] == {
                "pending": 4, "done": 1, "failed": 1, "dead": 1, "gone": 1, "parked": 1,
            }  # fmt: skip
            # The new ledger runs on it: claim two, start them (an open batch).
            (batch,) = ledger.claim_batches(
                s, task="intent", limit=2, batch_size=2, lease_seconds=600
            )
            ledger.start_batch(
                s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w",
                lease_seconds=600,
            )  # fmt: skip

        downgrade(url, "0010")
        assert OLD_INDEXES <= _indexes(url)
        now = _statuses(url)
        assert {i: now[i][0] for i in batch.item_ids} == dict.fromkeys(batch.item_ids, "queued")
        rest = [i for i in open_ids if i not in batch.item_ids]
        assert {i: now[i][0] for i in rest} == dict.fromkeys(rest, "pending")
        with transaction(url) as s:
            got = s.execute(
                text(
                    "SELECT DISTINCT CAST(batch_id AS text), lease_until > now() FROM work_items "
                    "WHERE status = 'queued'"
                )
            ).all()
            assert got == [(batch.batch_id, True)]
            tables = set(
                s.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
            assert not {"work_queue", "batches"} & tables

        upgrade(url)  # and forward again: the queued pair is pending and queued again
        with transaction(url) as s:
            assert ledger.claimable(s, task="intent", source_kind="conversation") == (4, 0)
    finally:
        drop_database(name)
