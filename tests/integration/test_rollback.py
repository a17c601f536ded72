"""`fleet rollback` (db.ladders.rollback) on the real Postgres, item by item: every
result copied at the promotion comes back exactly, whatever happened to its item
since (answered by the new model, still waiting, failed, its content changed, deleted),
the result it replaces is archived, items of other tasks and new items are untouched."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import text

from db.engine import transaction
from db.history import reset_items
from db.ladders import promote, rollback

RESULT_COLS = (
    "label, confidence, scores, output, model_name, model_revision, model_tier, created_at"
)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def add_item(s, n: int, *, task: str = "intent", label: str | None = None) -> int:
    """Conversation n with a done item of `task` and an old-model result (label A/B)."""
    cid = s.execute(
        text(
            "INSERT INTO conversations (external_id, messages, source) "
            "VALUES (:e, CAST(:m AS jsonb), 'app') RETURNING id"
        ),
        {"e": f"c{n}", "m": json.dumps([{"role": "user", "content": f"text {n}"}])},
    ).scalar_one()
    wid = s.execute(
        text(
            "INSERT INTO work_items (source_kind, source_id, task, status) "
            "VALUES ('conversation', :c, :t, 'done') RETURNING id"
        ),
        {"c": cid, "t": task},
    ).scalar_one()
    label = label or "AB"[n % 2]
    s.execute(
        text(
            "INSERT INTO results (work_item_id, label, confidence, scores, output, model_name, "
            "model_tier, device, latency_ms, created_at, model_revision) VALUES (:w, :l, :c, "
            "CAST(:sc AS jsonb), CAST(:o AS jsonb), 'old', 0, 'cpu', 3.0, :t, 'sha256:old')"
        ),
        {
            "w": wid,
            "l": label,
            "c": 0.5 + n / 100,
            "sc": json.dumps({label: 0.5 + n / 100, "C": 0.1}),
            "o": json.dumps({"n": n}),
            "t": T0 + dt.timedelta(minutes=n),
        },
    )
    return wid


def new_answer(s, wid: int, n: int) -> None:
    """The promoted model's result for an item (as a worker stores it), item done."""
    s.execute(
        text(
            "UPDATE results SET label = 'N', confidence = 0.99, scores = '{\"N\": 0.99}', "
            "output = NULL, model_name = 'new', model_revision = 'sha256:new', model_tier = 1, "
            "device = 'cuda', created_at = :t WHERE work_item_id = :w"
        ),
        {"w": wid, "t": T0 + dt.timedelta(days=1, minutes=n)},
    )
    s.execute(text("UPDATE work_items SET status = 'done' WHERE id = :w"), {"w": wid})


def results_of(s, ids) -> dict[int, tuple]:
    rows = s.execute(
        text(
            f"SELECT work_item_id, {RESULT_COLS} FROM results "
            "WHERE work_item_id = ANY(CAST(:ids AS bigint[]))"
        ),
        {"ids": list(ids)},
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def test_rollback_restores_every_copied_result_exactly(db_url):
    with transaction(db_url) as s:
        ids = {n: add_item(s, n) for n in range(1, 8)}
        other = add_item(s, 50, task="other")
        before = results_of(s, ids.values())
        other_before = results_of(s, [other])
    with transaction(db_url) as s:
        oid, back = promote(s, task="intent", ladder=[{"name": "new", "path": "new"}], gates={})
    assert back == 7
    with transaction(db_url) as s:
        new_answer(s, ids[1], 1)  # answered by the new model
        new_answer(s, ids[2], 2)
        # ids[3]: still pending, its old result served
        s.execute(  # the new model failed on it; the old result is kept
            text("UPDATE work_items SET status = 'failed', last_error = 'x' WHERE id = :w"),
            {"w": ids[4]},
        )
        reset_items(s, item_ids=[ids[5]], reason="content_changed")  # no result row now
        s.execute(text("DELETE FROM work_items WHERE id = :w"), {"w": ids[6]})  # gone for good
        s.execute(  # a batch holds it while the rollback runs
            text("UPDATE work_items SET status = 'queued', worker = 'w1' WHERE id = :w"),
            {"w": ids[7]},
        )
        late = add_item(s, 60)  # an item that arrived after the promotion
        new_answer(s, late, 60)
        late_before = results_of(s, [late])
        at_rollback = results_of(s, ids.values())

    with transaction(db_url) as s:
        assert rollback(s, task="intent") == (oid, 6)
    with transaction(db_url) as s:
        kept = [n for n in ids if n != 6]
        now = results_of(s, [ids[n] for n in kept])
        assert now == {ids[n]: before[ids[n]] for n in kept}  # every column, exactly
        devices = s.execute(
            text("SELECT DISTINCT device, latency_ms FROM results WHERE work_item_id = ANY(:i)"),
            {"i": [ids[n] for n in kept]},
        ).all()
        assert devices == [("restored", 0.0)]
        statuses = dict(
            s.execute(text("SELECT id, status FROM work_items WHERE task = 'intent'")).all()
        )
        assert {statuses[ids[n]] for n in kept} == {"done"} and statuses[late] == "done"
        assert (
            s.execute(text("SELECT worker FROM work_items WHERE id = :w"), {"w": ids[7]}).scalar()
            is None
        )
        # the results replaced are archived as they were at the rollback, one per item
        archived = s.execute(
            text(
                f"SELECT work_item_id, {RESULT_COLS.replace('created_at', 'classified_at')}, "
                "source, external_id FROM result_history WHERE reason = :r"
            ),
            {"r": f"rollback:{oid}"},
        ).all()
        assert {a[0]: tuple(a[1:9]) for a in archived} == {
            ids[n]: at_rollback[ids[n]] for n in (1, 2, 3, 4, 7)
        }
        assert {(a[9], a[10]) for a in archived} == {("app", f"c{n}") for n in (1, 2, 3, 4, 7)}
        assert results_of(s, [late]) == late_before  # not part of the promotion
        assert results_of(s, [other]) == other_before
        assert s.execute(
            text("SELECT rolled_back_at IS NOT NULL FROM ladder_overrides WHERE id = :i"),
            {"i": oid},
        ).scalar_one()
        assert rollback(s, task="intent") is None  # nothing left to roll back


def test_two_promotions_roll_back_one_at_a_time(db_url):
    with transaction(db_url) as s:
        ids = [add_item(s, n) for n in range(1, 5)]
        first = results_of(s, ids)
    with transaction(db_url) as s:
        oid1, _ = promote(s, task="intent", ladder=[{"name": "b", "path": "b"}], gates={})
        for n, w in enumerate(ids):
            new_answer(s, w, n)
        second = results_of(s, ids)
    with transaction(db_url) as s:
        oid2, _ = promote(s, task="intent", ladder=[{"name": "c", "path": "c"}], gates={})
        s.execute(text("UPDATE results SET label = 'third'"))
    with transaction(db_url) as s:
        assert rollback(s, task="intent") == (oid2, 4)
        assert results_of(s, ids) == second
    with transaction(db_url) as s:
        assert rollback(s, task="intent") == (oid1, 4)
        assert results_of(s, ids) == first
