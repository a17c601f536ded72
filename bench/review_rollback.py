"""`fleet promote` bookkeeping and `fleet rollback` over N stored results.

    .venv/bin/python -m bench.review_rollback [--rows 1000000] [--repeats 3]

Against the local Postgres (TEST_ADMIN_DATABASE_URL, default 127.0.0.1), in a
migrated database of its own: N conversations, one done item and one result
each (the "old model"); then
  promote   db.ladders.promote: the ladder row, N results copied to
            result_history, N items pending again (one transaction)
  relabel   every result replaced by a "new model" answer (one UPDATE, standing
            in for the workers' writes; not timed against the target), then
            VACUUM ANALYZE, standing in for the autovacuum that runs during the
            hours the workers take
  side by side  `--repeats` rounds of the rollback before this change
            (`rollback_before`, kept here verbatim) and db.ladders.rollback,
            alternating, each in a transaction that checks every restored label
            and is then rolled back (the state stays the same for the next), with
            a VACUUM and a CHECKPOINT before each so both start alike
  rollback  db.ladders.rollback as `fleet rollback` runs it, committed (one
            transaction: N results archived, N restored in place, the override
            marked), and every restored label checked after the commit
Prints each step's seconds, the side-by-side medians and the load average
(the machine is shared: compare only figures of one run).
Target: rollback of 1,000,000 results under 60 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import text

from db.ladders import current_override
from db.ledger import _rowcount

ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

FILL = [
    """
    INSERT INTO conversations (id, external_id, messages)
    SELECT i, 'c' || i, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'text ' || i))
    FROM generate_series(1, %(n)s) AS i
    """,
    """
    INSERT INTO work_items (id, source_kind, source_id, task, status)
    SELECT i, 'conversation', i, 'intent', 'done' FROM generate_series(1, %(n)s) AS i
    """,
    """
    INSERT INTO results (work_item_id, label, confidence, scores, model_name, model_revision,
                         model_tier, device, latency_ms)
    SELECT i, 'old' || (i %% 8), 0.9, jsonb_build_object('old' || (i %% 8), 0.9), 'old',
           'sha256:old', 0, 'cpu', 1.0
    FROM generate_series(1, %(n)s) AS i
    """,
]


def rollback_before(session: Any, *, task: str) -> tuple[int, int] | None:
    """The rollback as it was before (kept to measure against, not used by the fleet).

    Undo the task's newest promotion in the caller's one transaction: every result
    copied at that promotion goes back into `results`, updated in place (the result
    there now, from either model, goes to result_history as `rollback:<id>`), those items are done
    again, and the override is marked rolled back. No model runs. Returns
    (override id, results restored), or None when no promotion is in force."""
    found = current_override(session, task=task)
    if found is None:
        return None
    oid = found[0]
    reason = f"promote:{oid}"
    session.execute(
        text(
            """
            CREATE TEMPORARY TABLE restore ON COMMIT DROP AS
            SELECT DISTINCT ON (h.work_item_id) h.* FROM result_history h
            JOIN work_items w ON w.id = h.work_item_id
            WHERE h.reason = :reason ORDER BY h.work_item_id, h.id DESC
            """
        ),
        {"reason": reason},
    )
    # Temporary tables are never analyzed by autovacuum: without this the planner
    # guesses their size and may join a million rows by nested loop.
    session.execute(text("ANALYZE restore"))
    session.execute(
        text(
            """
            INSERT INTO result_history (work_item_id, task, source_kind, source_id, source,
                                        external_id, label, confidence, scores, output,
                                        model_name, model_revision, model_tier, classified_at,
                                        reason)
            SELECT r.work_item_id, x.task, x.source_kind, x.source_id, x.source, x.external_id,
                   r.label, r.confidence, r.scores, r.output, r.model_name, r.model_revision,
                   r.model_tier, r.created_at, :reason
            FROM results r JOIN restore x ON x.work_item_id = r.work_item_id
            """
        ),
        {"reason": f"rollback:{oid}"},
    )
    # One UPDATE in place (not DELETE + INSERT): each row is written once.
    restored = _rowcount(
        session.execute(
            text(
                """
                UPDATE results r SET label = x.label, confidence = x.confidence,
                    scores = x.scores, output = x.output, model_name = x.model_name,
                    model_revision = x.model_revision, model_tier = x.model_tier,
                    device = 'restored', latency_ms = 0, created_at = x.classified_at
                FROM restore x WHERE r.work_item_id = x.work_item_id
                """
            )
        )
    )
    restored += _rowcount(
        session.execute(
            text(
                """
                INSERT INTO results (work_item_id, label, confidence, scores, output, model_name,
                                     model_revision, model_tier, device, latency_ms, created_at)
                SELECT work_item_id, label, confidence, scores, output, model_name,
                       model_revision, model_tier, 'restored', 0, classified_at
                FROM restore x
                WHERE NOT EXISTS (SELECT 1 FROM results r WHERE r.work_item_id = x.work_item_id)
                """
            )
        )
    )
    # Items the new model already finished are done: only the others are written.
    session.execute(
        text(
            """
            UPDATE work_items w SET status = 'done', batch_id = NULL, lease_until = NULL,
                worker = NULL, last_error = NULL, updated_at = now()
            FROM restore x
            WHERE w.id = x.work_item_id AND w.status <> 'done'
            """
        )
    )
    session.execute(
        text("UPDATE ladder_overrides SET rolled_back_at = now() WHERE id = :id"), {"id": oid}
    )
    return oid, restored


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="Stored results.")
    ap.add_argument(
        "--repeats", type=int, default=3, help="Side-by-side rounds (0: only the committed run)."
    )
    args = ap.parse_args()

    from db.engine import transaction
    from db.ladders import promote, rollback
    from db.migrate import upgrade

    name = f"bench_review_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    plain = ADMIN.rsplit("/", 1)[0] + "/" + name
    url = plain.replace("postgresql://", "postgresql+psycopg://")
    wrong_sql = "SELECT COUNT(*) FROM results WHERE label <> 'old' || (work_item_id % 8)"
    try:
        upgrade(url)
        t0 = time.perf_counter()
        with psycopg.connect(plain, autocommit=True) as conn:
            for statement in FILL:
                conn.execute(statement, {"n": args.rows})
            conn.execute("ANALYZE")
        print(f"setup: {args.rows:,} results in {time.perf_counter() - t0:.1f}s ({_load()})")

        def step(label: str, fn) -> float:  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - start
            print(f"{label:9} {secs:7.1f}s  {args.rows / secs:>11,.0f} rows/s  ({out}; {_load()})")
            return secs

        def do_promote() -> object:
            with transaction(url) as s:
                return promote(s, task="intent", ladder=[{"name": "new", "path": "new"}], gates={})

        def relabel() -> object:
            with transaction(url) as s:
                s.execute(
                    text(
                        "UPDATE results SET label = 'new', model_name = 'new', "
                        "model_revision = 'sha256:new', created_at = now()"
                    )
                )
                s.execute(text("UPDATE work_items SET status = 'done'"))
            with psycopg.connect(plain, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            return "new model's answers written, vacuumed"

        def settle() -> None:
            with psycopg.connect(plain, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE results, result_history, work_items")
                conn.execute("CHECKPOINT")

        def trial(fn: Any) -> float:
            from db.engine import session_factory

            settle()
            with session_factory(url)() as s:
                start = time.perf_counter()
                out = fn(s, task="intent")
                secs = time.perf_counter() - start
                wrong = s.execute(text(wrong_sql)).scalar_one()
                s.rollback()
            assert out is not None and out[1] == args.rows and wrong == 0, (out, wrong)
            return secs

        step("promote", do_promote)
        step("relabel", relabel)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.repeats):
            for label, fn in (("before", rollback_before), ("after", rollback)):
                times[label].append(trial(fn))
                print(f"  round {r + 1} {label:6} {times[label][-1]:6.1f}s  ({_load()})")
        if args.repeats:
            b, a = statistics.median(times["before"]), statistics.median(times["after"])
            print(
                f"side by side, median of {args.repeats}: before {b:.1f}s, after {a:.1f}s "
                f"({b / a:.2f}x)"
            )
        settle()

        def do_rollback() -> object:
            with transaction(url) as s:
                return rollback(s, task="intent")

        secs = step("rollback", do_rollback)
        with psycopg.connect(plain) as conn:
            wrong = conn.execute(wrong_sql).fetchone()
        print(
            f"rollback of {args.rows:,} results: {secs:.1f}s (target < 60 s: "
            f"{'met' if secs < 60 else 'missed'}); labels not restored: {wrong[0] if wrong else '?'}"
        )
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
