"""`fleet sync` before and after, side by side in one run: a first pass over N
source rows, then 1% edited and synced again, then a pass with nothing changed.

    .venv/bin/python -m bench.sync [--rows 20000] [--edit 0.01] [--chunk 5000]
    .venv/bin/python -m bench.sync --rows 1000000              # the scale target
    .venv/bin/python -m bench.sync --rows 200000 --shape messages

"before" is db/sync.py as of --baseline (a git revision, default the commit
before the mark was held back by transaction and rows were grouped by key),
loaded from git into this process; "after" is the working tree's. Each writes
its own fleet database; both read the same application database, on the local
Postgres (TEST_ADMIN_DATABASE_URL, default 127.0.0.1):

  setup   app.conversations with jsonb messages and an indexed updated_at
          (--shape messages: app.messages, three rows per conversation, folded)
  pass 1  full: every row is new (before, then after); then the items of one
          task are discovered, as a nightly run would
  edit    --edit of the conversations get a new message (updated_at = now())
  pass 2  incremental, before then after: the edited rows and the key scan
  pass 3  incremental with nothing changed, after then before (the reverse
          order, so neither always meets the warmer cache)

Prints each pass' seconds (content pass and key scan apart) for both and the
ratio after / before; the target is pass 2 within 1.5x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

APP_SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.conversations (
    id bigint PRIMARY KEY, language text, messages jsonb, updated_at timestamptz NOT NULL
);
CREATE TABLE app.messages (
    conversation_id bigint NOT NULL, seq int NOT NULL, role text NOT NULL, body text NOT NULL,
    updated_at timestamptz NOT NULL, PRIMARY KEY (conversation_id, seq)
);
"""
FILL_JSONB = """
INSERT INTO app.conversations
SELECT i, 'en',
       jsonb_build_array(
           jsonb_build_object('role', 'user', 'content',
               'conversation ' || i || ': my report for the ' || (i %% 97) || ' team is late again'),
           jsonb_build_object('role', 'assistant', 'content', 'What is blocking it?'),
           jsonb_build_object('role', 'user', 'content', repeat('waiting on data ', 1 + i %% 7))),
       now() - interval '1 day' + (i %% 86400) * interval '1 second'
FROM generate_series(1, %(n)s) AS i
"""
FILL_MESSAGES = """
INSERT INTO app.conversations (id, language, updated_at)
SELECT i, 'en', now() - interval '1 day' + (i %% 86400) * interval '1 second'
FROM generate_series(1, %(n)s) AS i;
INSERT INTO app.messages
SELECT i, s, CASE WHEN s = 1 THEN 'assistant' ELSE 'user' END,
       'conversation ' || i || ' message ' || s || ': ' || repeat('waiting on data ', 1 + i %% 7),
       now() - interval '1 day' + (i %% 86400) * interval '1 second'
FROM generate_series(1, %(n)s) AS i, generate_series(0, 2) AS s;
"""
INDEXES = """
CREATE INDEX ON app.conversations (updated_at);
CREATE INDEX ON app.messages (updated_at);
ANALYZE app.conversations; ANALYZE app.messages;
"""
EDIT_JSONB = """
UPDATE app.conversations
SET messages = messages || '[{"role": "user", "content": "and one more thing"}]', updated_at = now()
WHERE id %% %(every)s = 0
"""
EDIT_MESSAGES = """
INSERT INTO app.messages
SELECT id, 3, 'user', 'and one more thing', now() FROM app.conversations WHERE id %% %(every)s = 0
"""
SOURCES = {
    "conversation": """
[sources.app]
query = "SELECT id::text AS external_id, messages, language, updated_at FROM app.conversations"
chunk = {chunk}
""",
    "messages": """
[sources.app]
shape = "messages"
query = '''
SELECT c.id::text AS external_id, m.role, m.body AS content, m.seq AS position,
       c.language, greatest(c.updated_at, m.updated_at) AS updated_at
FROM app.conversations c JOIN app.messages m ON m.conversation_id = c.id
'''
chunk = {chunk}
""",
}


def _db(name: str) -> str:
    return ADMIN.rsplit("/", 1)[0] + "/" + name


BASELINE = "ed1c0fc"  # db/sync.py before this comparison's changes


def load_before(rev: str) -> ModuleType:
    """db/sync.py at git revision `rev`, as a module of its own (it imports only
    db.history, db.ledger and config, whose interfaces it still finds)."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:db/sync.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"cannot read db/sync.py at {rev} from git ({e}); run from a clone that has it, "
            "or pass --baseline REV"
        ) from None
    module = ModuleType("bench_sync_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"{rev}:db/sync.py", "exec"), module.__dict__)
    return module


def timed(sync: Any, fleet: Any, source: Any, spec: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    report = sync(fleet, source, spec)
    return report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20_000, help="Source conversations.")
    ap.add_argument("--edit", type=float, default=0.01, help="Fraction edited before pass 2.")
    ap.add_argument("--chunk", type=int, default=5000, help="Rows per cursor fetch.")
    ap.add_argument("--shape", choices=sorted(SOURCES), default="conversation")
    ap.add_argument("--baseline", default=BASELINE, help="Git revision of 'before'.")
    args = ap.parse_args()

    from config.taskconfig import parse_sources
    from db import sync as after_module
    from db.engine import dispose_all, get_engine, transaction
    from db.ledger import analyze, discover
    from db.migrate import upgrade

    before_module = load_before(args.baseline)
    impls = {"before": before_module.sync_source, "after": after_module.sync_source}
    spec = parse_sources(tomllib.loads(SOURCES[args.shape].format(chunk=args.chunk)))["app"]
    tag = uuid.uuid4().hex[:8]
    app_db = f"bench_app_{tag}"
    fleet_dbs = {name: f"bench_fleet_{name}_{tag}" for name in impls}
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        for name in (app_db, *fleet_dbs.values()):
            conn.execute(f'CREATE DATABASE "{name}"')
    sa = {n: _db(d).replace("postgresql://", "postgresql+psycopg://") for n, d in fleet_dbs.items()}
    rows: dict[str, dict[str, tuple[Any, float]]] = {}
    try:
        t0 = time.perf_counter()
        with psycopg.connect(_db(app_db), autocommit=True) as conn:
            conn.execute(APP_SCHEMA)
            fill = FILL_JSONB if args.shape == "conversation" else FILL_MESSAGES
            for statement in fill.split(";"):
                if statement.strip():
                    conn.execute(statement, {"n": args.rows})
            conn.execute(INDEXES)
        for url in sa.values():
            upgrade(url)
        source = get_engine(_db(app_db).replace("postgresql://", "postgresql+psycopg://"))
        print(
            f"setup: {args.rows:,} conversations ({args.shape} shape) in "
            f"{time.perf_counter() - t0:.1f}s; before = db/sync.py at {args.baseline}"
        )
        rows["pass 1 (full)"] = {
            n: timed(impls[n], get_engine(sa[n]), source, spec) for n in ("before", "after")
        }
        for url in sa.values():
            with transaction(url) as s:
                discover(s, task="intent", source_kind="conversation")
                analyze(s)  # as `fleet enqueue` does after a bulk claim
        every = max(1, round(1 / args.edit))
        with psycopg.connect(_db(app_db), autocommit=True) as conn:
            edited = conn.execute(
                EDIT_JSONB if args.shape == "conversation" else EDIT_MESSAGES, {"every": every}
            ).rowcount
        print(f"edited: {edited:,} conversations ({edited / args.rows:.2%})")
        rows["pass 2 (incremental, edited)"] = {
            n: timed(impls[n], get_engine(sa[n]), source, spec) for n in ("before", "after")
        }
        third = {n: timed(impls[n], get_engine(sa[n]), source, spec) for n in ("after", "before")}
        rows["pass 3 (incremental, unchanged)"] = {n: third[n] for n in ("before", "after")}
    finally:
        dispose_all()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            for name in (app_db, *fleet_dbs.values()):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    for name, by in rows.items():
        print(name)
        for impl, (r, secs) in by.items():
            print(
                f"  {impl:6}: {secs:7.2f}s (content {r.read_seconds:.2f}s + key scan "
                f"{r.delete_scan_seconds:.2f}s); read {r.read:,} rows, {r.new:,} new, "
                f"{r.changed:,} changed, {r.unchanged:,} unchanged"
            )
        ratio = by["after"][1] / max(by["before"][1], 1e-9)
        print(f"  after / before: {ratio:.2f}")


if __name__ == "__main__":
    main()
