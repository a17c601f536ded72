"""`fleet sync` at scale: a first pass over N source rows, then 1% edited and synced again.

    .venv/bin/python -m bench.sync [--rows 1000000] [--edit 0.01] [--chunk 5000]
    .venv/bin/python -m bench.sync --rows 200000 --shape messages

Against the local Postgres (TEST_ADMIN_DATABASE_URL, default 127.0.0.1), in one run:
  setup   an application database of its own (app.conversations with jsonb
          messages and an indexed updated_at; --shape messages: app.messages, one
          row per message, three per conversation, folded by the fleet) and a
          migrated fleet database
  pass 1  `fleet sync` (the real CLI subprocess): every row is new
          then the items of one task are discovered, as a nightly run would
  edit    --edit of the conversations get a new message (updated_at = now())
  pass 2  `fleet sync` again: incremental from the watermark
Prints for each pass its rows/s, seconds (content pass and key scan apart, from
`fleet sync --json`) and the peak resident memory of the process; and the
second pass's cost relative to the first, which should be near the edited
fraction (plus the key scan that finds deleted rows, which reads every key).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
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


def run_sync(env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """(`fleet sync --json` report, seconds, peak RSS in MiB) of the CLI subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "sync", "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = 0.0

    def watch() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, p.memory_info().rss / 2**20)
            except psutil.Error:
                break
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    out, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"fleet sync failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out)[0], time.perf_counter() - start, peak


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="Source conversations.")
    ap.add_argument("--edit", type=float, default=0.01, help="Fraction edited before pass 2.")
    ap.add_argument("--chunk", type=int, default=5000, help="Rows per cursor fetch.")
    ap.add_argument("--shape", choices=sorted(SOURCES), default="conversation")
    ap.add_argument("--keep", action="store_true", help="Keep the two databases.")
    args = ap.parse_args()

    from db.engine import transaction
    from db.ledger import analyze, discover
    from db.migrate import upgrade

    tag = uuid.uuid4().hex[:8]
    app_db, fleet_db = f"bench_app_{tag}", f"bench_fleet_{tag}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{app_db}"')
        conn.execute(f'CREATE DATABASE "{fleet_db}"')
    fleet_url = _db(fleet_db).replace("postgresql://", "postgresql+psycopg://")
    try:
        t0 = time.perf_counter()
        with psycopg.connect(_db(app_db), autocommit=True) as conn:
            conn.execute(APP_SCHEMA)
            fill = FILL_JSONB if args.shape == "conversation" else FILL_MESSAGES
            for statement in fill.split(";"):
                if statement.strip():
                    conn.execute(statement, {"n": args.rows})
            conn.execute(INDEXES)
        upgrade(fleet_url)
        print(
            f"setup: {args.rows:,} conversations ({args.shape} shape) in {time.perf_counter() - t0:.1f}s"
        )
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "tasks.toml"
            config.write_text(
                'include_bundled = false\n[tasks.intent]\nkind = "fake"\nsource = "conversation"\n'
                '[[tasks.intent.ladder]]\nname = "fake"\npath = "fake"\n'
                + SOURCES[args.shape].format(chunk=args.chunk)
            )
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "DATABASE_URL"))
            }
            env |= {
                "DATABASE_URL": fleet_url,
                "BROKER_URL": "redis://127.0.0.1:6379/14",
                "FLEET_SOURCE_DATABASE_URL": _db(app_db),
                "FLEET_CONFIG_FILE": str(config),
                "FLEET_STATE_DIR": str(Path(tmp) / "state"),
            }
            first, s1, mem1 = run_sync(env)
            t0 = time.perf_counter()
            with transaction(fleet_url) as s:
                items = discover(s, task="intent", source_kind="conversation")
                # As `fleet enqueue` does after a bulk claim (ledger.analyze): the next
                # night's sync meets a ledger with current planner statistics.
                analyze(s)
            print(
                f"discover: {items:,} work items in {time.perf_counter() - t0:.1f}s (not part of sync)"
            )
            every = max(1, round(1 / args.edit))
            with psycopg.connect(_db(app_db), autocommit=True) as conn:
                edited = conn.execute(
                    EDIT_JSONB if args.shape == "conversation" else EDIT_MESSAGES, {"every": every}
                ).rowcount
            second, s2, mem2 = run_sync(env)
    finally:
        if not args.keep:
            from db.engine import dispose_all

            dispose_all()
            with psycopg.connect(ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{app_db}" WITH (FORCE)')
                conn.execute(f'DROP DATABASE IF EXISTS "{fleet_db}" WITH (FORCE)')

    def line(name: str, r: dict[str, Any], secs: float, mem: float) -> None:
        print(
            f"{name}: read {r['read']:,} rows, {r['new']:,} new, {r['changed']:,} changed "
            f"({r['items_reset']:,} items back to pending), {r['unchanged']:,} unchanged; "
            f"content {r['read_seconds']:.1f}s + key scan {r['delete_scan_seconds']:.1f}s; "
            f"process {secs:.1f}s, {r['read'] / max(r['read_seconds'], 1e-9):,.0f} rows/s read, "
            f"peak RSS {mem:.0f} MiB"
        )

    line("pass 1 (full)", first, s1, mem1)
    print(f"edited: {edited:,} conversations ({edited / args.rows:.2%})")
    line("pass 2 (incremental)", second, s2, mem2)
    print(
        f"pass 2 / pass 1: content {second['read_seconds'] / first['read_seconds']:.3f}, "
        f"content + key scan {second['seconds'] / first['seconds']:.3f}, "
        f"whole process {s2 / s1:.3f} (edited fraction {edited / args.rows:.3f})"
    )


if __name__ == "__main__":
    main()
