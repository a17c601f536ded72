"""`fleet promote` bookkeeping and `fleet rollback` over N stored results.

    .venv/bin/python -m bench.review_rollback [--rows 1000000] [--repeats 3]

Against the local Postgres (TEST_ADMIN_DATABASE_URL, default 127.0.0.1), in a
migrated database of its own: N conversations, one done item and one result
each (the "old model"); then
  promote   db.ladders.promote: the ladder row, N results copied to
            result_history, N items pending again (one transaction)
  relabel   every result replaced by a "new model" answer (one UPDATE, standing
            in for the workers' writes; not timed against the target); with
            --vacuum, then VACUUM ANALYZE, standing in for the autovacuum that
            runs during the hours the workers take
  rollback  db.ladders.rollback as `fleet rollback` runs it (one transaction: N
            results archived, N restored in place, the override marked)
Prints each step's wall seconds, the database backend's CPU seconds for the
rollback (from /proc, the server being local: the machine is shared, and CPU
seconds move less with other jobs' load than wall seconds) and the load
average; checks every restored label is the old one.
Target: rollback of 1,000,000 results under 60 s.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

import psycopg
from sqlalchemy import text

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


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) a local database backend has used; None when the
    server is not on this machine."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="Stored results.")
    ap.add_argument("--vacuum", action="store_true", help="VACUUM ANALYZE after the relabel.")
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
            if args.vacuum:
                with psycopg.connect(plain, autocommit=True) as conn:
                    conn.execute("VACUUM ANALYZE")
            return "new model's answers written" + (", vacuumed" if args.vacuum else "")

        cpu: list[float] = []

        def do_rollback() -> object:
            with transaction(url) as s:
                pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
                before = _cpu_seconds(pid)
                out = rollback(s, task="intent")
            after = _cpu_seconds(pid)
            if before is not None and after is not None:
                cpu.append(after - before)
            return out

        step("promote", do_promote)
        step("relabel", relabel)
        secs = step("rollback", do_rollback)
        with psycopg.connect(plain) as conn:
            wrong = conn.execute(wrong_sql).fetchone()
        print(
            f"rollback of {args.rows:,} results: {secs:.1f}s wall, "
            f"{f'{cpu[0]:.1f}s' if cpu else 'n/a'} database CPU (target < 60 s: "
            f"{'met' if secs < 60 else 'missed'}); labels not restored: {wrong[0] if wrong else '?'}"
        )
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
