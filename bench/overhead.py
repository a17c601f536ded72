"""Fleet overhead against the bare model, and against the one-at-a-time way.

    .venv/bin/python -m bench.overhead [--items 2000] [--batch-size 64] [--workers N]

Measured side by side in one run, same model (MiniLM-L6 encoder with an
8-label head: the intent classifier's architecture and cost), same texts:
  bare      the adapter alone, length-sorted batches, in this process
  fleet     ingest -> Postgres -> `fleet run` -> Redis -> real celery worker(s) -> results in Postgres
            (--workers N: N workers share the machine's cores, each with cores/N torch threads)
  pipeline1 a transformers pipeline called once per conversation (the old scripts)
  pipeline32  pipeline(..., batch_size=32), no length sorting
Prints items/s for each and the ratios. Needs Postgres and Redis
(TEST_ADMIN_DATABASE_URL / TEST_REDIS_URL, default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/14"

WORDS = (
    "report deadline manager friend sister course exam happy anxious goal dream weather "
    "document policy handbook lonely angry promotion meeting study lecture party"
).split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.choice([6, 12, 24, 48, 96, 160])))
        for _ in range(n)
    ]


def build_model(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fleet.models import minilm_path
    from workers.train import INTENT_LABELS as labels

    m = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()),
        num_labels=8,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    m.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder)
    return folder


def bare(model: Path, items: list[str], batch_tokens: int) -> float:
    from workers.adapters.base import Source, TierSpec
    from workers.adapters.sequence_classify import SequenceClassifyAdapter
    from workers.policy import plan_batches

    a = SequenceClassifyAdapter()
    a.load(TierSpec(name="m", path="", max_length=256), str(model), "cpu")
    srcs = [
        Source(i, "conversation", str(i), {"messages": [{"role": "user", "content": t}]})
        for i, t in enumerate(items)
    ]
    start = time.perf_counter()
    prepared = {s.item_id: a.prepare(s) for s in srcs}
    for plan in plan_batches([(i, p.cost) for i, p in prepared.items()], max_tokens=batch_tokens):
        a.predict([prepared[i] for i in plan])
    return len(items) / (time.perf_counter() - start)


def pipeline_rate(model: Path, items: list[str], batch_size: int | None) -> float:
    from transformers import pipeline

    clf = pipeline(
        "text-classification", model=str(model), device="cpu", truncation=True, max_length=256
    )
    inputs = [f"user: {t}" for t in items]
    start = time.perf_counter()
    if batch_size is None:
        for t in inputs:
            clf(t)
    else:
        clf(inputs, batch_size=batch_size)
    return len(items) / (time.perf_counter() - start)


def fleet(
    model: Path, items: list[str], batch_size: int, batch_tokens: int, tmp: Path, workers: int = 1
) -> float:
    import redis

    name = f"fleet_bench_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS).flushdb()
    (tmp / "tasks.toml").write_text(
        f'[tasks.intent]\nkind = "sequence_classify"\nsource = "conversation"\n'
        f'[[tasks.intent.ladder]]\nname = "minilm"\npath = "{model}"\nmax_length = 256\n'
        f"max_batch_tokens = {batch_tokens}\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BROKER_URL": REDIS,
        "FLEET_CONFIG_FILE": str(tmp / "tasks.toml"),
        "FLEET_STATE_DIR": str(tmp / "state"),
        "FLEET_BATCH_SIZE": str(batch_size),
        "FLEET_MAX_INFLIGHT_BATCHES": "8",
        "CUDA_VISIBLE_DEVICES": "",
    }
    fl = [sys.executable, "-m", "fleet.cli"]
    subprocess.run([*fl, "migrate"], env=env, check=True, capture_output=True)
    with (tmp / "c.jsonl").open("w") as f:
        for i, t in enumerate(items):
            f.write(
                json.dumps({"external_id": f"b{i}", "messages": [{"role": "user", "content": t}]})
                + "\n"
            )
    subprocess.run(
        [*fl, "ingest", "conversations", str(tmp / "c.jsonl")],
        env=env,
        check=True,
        capture_output=True,
    )
    from fleet.cli import worker_argv

    procs = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    for k in range(workers):
        log = (tmp / f"worker{k}.log").open("wb")
        argv = worker_argv("intent", gpu=None, loglevel="WARNING", hostname=f"intent@cpu{k}.%h")
        wenv = {**env, "OMP_NUM_THREADS": str(threads)} if workers > 1 else env
        procs.append(subprocess.Popen(argv, env=wenv, stdout=log, stderr=log))
    try:
        # Let the workers load their model first: the ratio is about steady-state throughput.
        _wait_workers(env, workers)
        time.sleep(1)
        subprocess.run(
            [*fl, "run", "-t", "intent", "--json"], env=env, check=True, capture_output=True
        )
        # From the run's start (before discovery and the first claim) to the last
        # result committed: the CLI's own start-up and final poll are not the fleet's cost.
        with psycopg.connect(url) as c:
            row = c.execute(
                "SELECT extract(epoch FROM (SELECT max(created_at) FROM results)"
                " - (SELECT min(started_at) FROM runs))"
            ).fetchone()
        assert row is not None
        rate = len(items) / float(row[0])
    finally:
        for w in procs:
            w.terminate()
        for w in procs:
            w.wait(timeout=60)
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return rate


def _wait_workers(env: dict[str, str], n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "ping", "-t", "5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ping.stdout.count("pong") >= n:
            return
        time.sleep(1)
    raise SystemExit(f"{n} worker(s) did not answer within {timeout:.0f}s; see worker*.log")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=1, help="fleet workers (cores are shared)")
    ap.add_argument(
        "--skip-pipeline1", action="store_true", help="skip the slow one-at-a-time baseline"
    )
    args = ap.parse_args()
    import torch

    items = texts(args.items)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = build_model(tmp / "model")
        rates = {"bare": bare(model, items, args.batch_tokens)}
        rates["fleet"] = fleet(
            model, items, args.batch_size, args.batch_tokens, tmp, workers=args.workers
        )
        rates["pipeline32"] = pipeline_rate(model, items, 32)
        if not args.skip_pipeline1:
            rates["pipeline1"] = pipeline_rate(model, items[: max(200, args.items // 5)], None)
    print(
        f"items={args.items} batch_size={args.batch_size} batch_tokens={args.batch_tokens} "
        f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} workers={args.workers}"
    )
    for k, v in rates.items():
        print(f"{k:12} {v:8.1f} items/s")
    print(f"fleet/bare        {rates['fleet'] / rates['bare']:.3f}")
    print(f"fleet/pipeline32  {rates['fleet'] / rates['pipeline32']:.2f}x")
    if "pipeline1" in rates:
        print(f"fleet/pipeline1   {rates['fleet'] / rates['pipeline1']:.2f}x")


if __name__ == "__main__":
    main()
