"""The producer and the ledger at scale.

    .venv/bin/python -m bench.producer [--items 1000000] [--batch-size 64]
    .venv/bin/python -m bench.producer --items 100000 --baseline 6a1dbd8 --rounds 3

In one run against the local Postgres and Redis (TEST_ADMIN_DATABASE_URL /
TEST_REDIS_URL, default 127.0.0.1), each step as the real CLI subprocess:
  ingest    `fleet ingest conversations` of a generated JSONL file
  enqueue   `fleet enqueue --task intent`: discover + claim (size order) + send
and, in process, the ledger's bulk result write:
  finish    `ledger.finish_batch` of 1,000-item batches (results upsert + states)
Prints items/s per step and the peak resident memory of each subprocess.

With `--baseline REV` the code at that git revision runs too, interleaved with
the working tree's on the same database (the ledger is emptied before each
enqueue): enqueue `--rounds` times per version (medians printed) and finish
batch by batch, so both see the same machine load. Figures from a busy machine
are only comparable within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import ModuleType

import psutil
import psycopg

REPO = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/13"


def timed(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
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
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def checkout(rev: str, dest: Path) -> Path:
    """The tracked files of the repository at `rev`, extracted into `dest`. Run
    from there, `python -m fleet.cli` imports that code (the working directory
    comes before the editable install on sys.path)."""
    data = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def load_ledger(root: Path, name: str) -> ModuleType:
    """`db/ledger.py` of another checkout as a module of its own name."""
    spec = importlib.util.spec_from_file_location(name, root / "db" / "ledger.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def write_backlog(path: Path, items: int) -> None:
    with path.open("w") as f:
        for i in range(items):
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


def empty_ledger(url: str) -> None:
    """Back to ingested sources only (not timed), so each enqueue starts from the
    same state."""
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("TRUNCATE results, work_items")
        c.execute("VACUUM ANALYZE work_items")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--baseline",
        metavar="GIT_REV",
        help="also run enqueue and finish_batch with the code at this revision, interleaved",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="enqueue runs per code version (median printed)"
    )
    args = ap.parse_args()
    import redis

    name = f"fleet_bench_producer_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS).flushdb()
    fl = [sys.executable, "-m", "fleet.cli"]
    enqueue: dict[str, list[tuple[float, float, int]]] = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            roots = {"current": REPO}
            if args.baseline:
                roots = {"baseline": checkout(args.baseline, Path(d) / "baseline"), **roots}
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "BROKER_URL": REDIS,
                "FLEET_STATE_DIR": str(Path(d) / "state"),
                "FLEET_BATCH_SIZE": str(args.batch_size),
            }
            subprocess.run([*fl, "migrate"], env=env, cwd=REPO, check=True, capture_output=True)
            path = Path(d) / "c.jsonl"
            write_backlog(path, args.items)
            ingest_s, ingest_mb = timed([*fl, "ingest", "conversations", str(path), "--json"], env)
            with psycopg.connect(url, autocommit=True) as c:  # not timed: as a settled backlog
                c.execute("VACUUM ANALYZE conversations")
            order = list(roots)
            for r in range(args.rounds):
                for version in order if r % 2 == 0 else order[::-1]:
                    empty_ledger(url)
                    s, mb = timed(
                        [*fl, "enqueue", "--task", "intent", "--json"], env, cwd=roots[version]
                    )
                    queued = int(redis.Redis.from_url(REDIS).llen("fleet.intent"))
                    enqueue.setdefault(version, []).append((s, mb, queued))
                    print(f"  enqueue {version}: {s:.1f} s", file=sys.stderr, flush=True)
            ledgers = {
                v: load_ledger(root, f"ledger_{v}") if v != "current" else None
                for v, root in roots.items()
            }
            finish = finish_benchmark(url, ledgers)
    finally:
        redis.Redis.from_url(REDIS).flushdb()
        from db.engine import dispose_all

        dispose_all()
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(args, ingest_s, ingest_mb, enqueue, finish)


def report(
    args: argparse.Namespace,
    ingest_s: float,
    ingest_mb: float,
    enqueue: dict[str, list[tuple[float, float, int]]],
    finish: dict[str, float],
) -> None:
    n = args.items
    print(
        f"items={n} batch_size={args.batch_size} cpus={os.cpu_count()} "
        f"baseline={args.baseline or '-'} rounds={args.rounds}"
    )
    print(
        f"ingest            {n / ingest_s:10.0f} items/s  {ingest_s:6.1f} s  peak {ingest_mb:6.0f} MiB"
    )
    for version, runs in enqueue.items():
        s = statistics.median(r[0] for r in runs)
        mb = max(r[1] for r in runs)
        times = ", ".join(f"{r[0]:.1f}" for r in runs)
        print(
            f"enqueue {version:9} {n / s:10.0f} items/s  {s:6.1f} s  peak {mb:6.0f} MiB  "
            f"({runs[-1][2]} batch messages in Redis; runs: {times} s)"
        )
    for version, rate in finish.items():
        print(
            f"finish  {version:9} {rate:10.0f} result rows/s (finish_batch, 1,000 items per batch)"
        )
    if "baseline" in enqueue:
        before = statistics.median(r[0] for r in enqueue["baseline"])
        after = statistics.median(r[0] for r in enqueue["current"])
        print(f"enqueue current/baseline  {before / after:.2f}x")
        print(f"finish  current/baseline  {finish['current'] / finish['baseline']:.2f}x")


def finish_benchmark(
    url: str, ledgers: dict[str, ModuleType | None], batches: int = 20, size: int = 1000
) -> dict[str, float]:
    """Claim/start 1,000-item batches of a fresh task and time only finish_batch:
    the bulk results upsert plus the guarded state update. With several ledger
    versions, each gets its own batches, alternating, so they share the load."""
    from sqlalchemy import text

    from db import ledger
    from db.engine import transaction

    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    versions = list(ledgers)
    with transaction(sa_url) as s:  # a fresh task over the same sources
        ledger.discover(
            s, task="bench", source_kind="conversation", limit=batches * size * len(versions)
        )
    with transaction(sa_url) as s:  # planner statistics of a settled table, whichever ran last
        s.execute(text("ANALYZE work_items"))
    total = dict.fromkeys(versions, 0.0)
    rows = dict.fromkeys(versions, 0)
    for k in range(batches * len(versions)):
        order = versions if (k // len(versions)) % 2 == 0 else versions[::-1]
        version = order[k % len(versions)]
        mod = ledgers[version] or ledger
        finish: Callable[..., object] = mod.finish_batch
        with transaction(sa_url) as s:
            (b,) = ledger.claim_batches(
                s, task="bench", limit=size, batch_size=size, lease_seconds=600
            )
        with transaction(sa_url) as s:
            ledger.start_batch(
                s, batch_id=b.batch_id, item_ids=b.item_ids, worker="bench", lease_seconds=600
            )
        outcomes = [
            mod.Outcome(
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
            finish(s, batch_id=b.batch_id, outcomes=outcomes)
        total[version] += time.perf_counter() - start
        rows[version] += len(outcomes)
    return {v: rows[v] / total[v] for v in versions}


if __name__ == "__main__":
    main()
