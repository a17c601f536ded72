"""The producer and the ledger at scale.

    .venv/bin/python -m bench.producer [--items 1000000] [--batch-size 64]

In one run against the local Postgres and Redis (TEST_ADMIN_DATABASE_URL /
TEST_REDIS_URL, default 127.0.0.1), each step as the real CLI subprocess:
  ingest    `fleet ingest conversations` of a generated JSONL file
  enqueue   `fleet enqueue --task intent`: discover + claim (size order) + send
and, in process, the ledger's bulk result write:
  finish    `ledger.finish_batch` of 1,000-item batches (results upsert + states)
Prints items/s per step and the peak resident memory of each subprocess.
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
from pathlib import Path

import psutil
import psycopg

ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/13"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    import redis

    name = f"fleet_bench_producer_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS).flushdb()
    fl = [sys.executable, "-m", "fleet.cli"]
    try:
        with tempfile.TemporaryDirectory() as d:
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "BROKER_URL": REDIS,
                "FLEET_STATE_DIR": str(Path(d) / "state"),
                "FLEET_BATCH_SIZE": str(args.batch_size),
            }
            subprocess.run([*fl, "migrate"], env=env, check=True, capture_output=True)
            path = Path(d) / "c.jsonl"
            with path.open("w") as f:
                for i in range(args.items):
                    words = " ".join(["status", "update", "on", "the", "report"] * (1 + i % 12))
                    f.write(
                        json.dumps(
                            {
                                "external_id": f"p{i}",
                                "messages": [
                                    {"role": "user", "content": f"{i}: {words}"},
                                    {"role": "assistant", "content": "noted"},
                                ],
                            }
                        )
                        + "\n"
                    )
            ingest_s, ingest_mb = timed([*fl, "ingest", "conversations", str(path), "--json"], env)
            enqueue_s, enqueue_mb = timed([*fl, "enqueue", "--task", "intent", "--json"], env)
        queued = redis.Redis.from_url(REDIS).llen("fleet.intent")
        finish_rate = finish_benchmark(url)
    finally:
        redis.Redis.from_url(REDIS).flushdb()
        from db.engine import dispose_all

        dispose_all()
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    n = args.items
    print(f"items={n} batch_size={args.batch_size} cpus={os.cpu_count()}")
    print(f"ingest   {n / ingest_s:10.0f} items/s  {ingest_s:6.1f} s  peak {ingest_mb:6.0f} MiB")
    print(
        f"enqueue  {n / enqueue_s:10.0f} items/s  {enqueue_s:6.1f} s  peak {enqueue_mb:6.0f} MiB  "
        f"({queued} batch messages in Redis)"
    )
    print(f"finish   {finish_rate:10.0f} result rows/s (finish_batch, 1,000 items per batch)")


def finish_benchmark(url: str, batches: int = 20, size: int = 1000) -> float:
    """Claim/start 1,000-item batches from the enqueued items' ledger and time only
    finish_batch: the bulk results upsert plus the guarded state update."""
    from sqlalchemy import text

    from db import ledger
    from db.engine import transaction

    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    with transaction(sa_url) as s:  # a fresh task over the same sources
        ledger.discover(s, task="bench", source_kind="conversation", limit=batches * size)
        s.execute(text("SELECT 1"))
    total = 0.0
    rows = 0
    for _ in range(batches):
        with transaction(sa_url) as s:
            (b,) = ledger.claim_batches(
                s, task="bench", limit=size, batch_size=size, lease_seconds=600
            )
        with transaction(sa_url) as s:
            ledger.start_batch(
                s, batch_id=b.batch_id, item_ids=b.item_ids, worker="bench", lease_seconds=600
            )
        outcomes = [
            ledger.Outcome(
                i,
                {
                    "label": "x",
                    "confidence": 0.5,
                    "scores": {"x": 0.5, "y": 0.3},
                    "output": None,
                    "model_name": "m",
                    "model_tier": 0,
                    "device": "cpu",
                    "latency_ms": 1.0,
                },
            )
            for i in b.item_ids
        ]
        start = time.perf_counter()
        with transaction(sa_url) as s:
            ledger.finish_batch(s, batch_id=b.batch_id, outcomes=outcomes)
        total += time.perf_counter() - start
        rows += len(outcomes)
    return rows / total


if __name__ == "__main__":
    main()
