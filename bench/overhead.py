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


def build_model(folder: Path, shape: str = "minilm") -> Path:
    """An 8-label classifier: the real MiniLM-L6 encoder with a new head, or
    (`shape="bert-base"`) a random-weight BERT-base (768 wide, 12 layers, 110M):
    the real cost of that architecture, meaningless answers."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    from fleet.models.catalogue import minilm_path

    labels = [f"label{i}" for i in range(8)]
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    if shape == "bert-base":
        cfg = BertConfig(vocab_size=tok.vocab_size, num_labels=8, **names)
        BertForSequenceClassification(cfg).save_pretrained(folder)
    else:
        m = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_path()), num_labels=8, **names
        )
        m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bare(
    model: Path, items: list[str], batch_tokens: int, device: str = "cpu", dtype: str = "auto"
) -> float:
    from config.taskconfig import TierSpec
    from workers.adapters.base import Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter
    from workers.policy import plan_batches

    a = SequenceClassifyAdapter()
    a.load(TierSpec(name="m", path="", max_length=256, dtype=dtype), str(model), device)
    if device.startswith("cuda"):  # warm up kernels and the allocator outside the timing
        warm = Source(-1, "conversation", "w", {"messages": [{"role": "user", "content": "hi"}]})
        a.predict([a.prepare(warm)])
    srcs = [
        Source(i, "conversation", str(i), {"messages": [{"role": "user", "content": t}]})
        for i, t in enumerate(items)
    ]
    start = time.perf_counter()
    prepared = {s.item_id: a.prepare(s) for s in srcs}
    for plan in plan_batches([(i, p.cost) for i, p in prepared.items()], max_tokens=batch_tokens):
        a.predict([prepared[i] for i in plan])
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - start)


def pipeline_rate(
    model: Path, items: list[str], batch_size: int | None, device: str = "cpu"
) -> float:
    from transformers import pipeline

    clf = pipeline(
        "text-classification", model=str(model), device=device, truncation=True, max_length=256
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
    model: Path,
    items: list[str],
    batch_size: int,
    batch_tokens: int,
    tmp: Path,
    workers: int = 1,
    gpu: int | None = None,
    dtype: str = "auto",
) -> float:
    import redis

    name = f"fleet_bench_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS).flushdb()
    (tmp / "tasks.toml").write_text(
        f'include_bundled = false\n[tasks.intent]\nkind = "sequence_classify"\nsource = "conversation"\n'
        f'[[tasks.intent.ladder]]\nname = "minilm"\npath = "{model}"\nmax_length = 256\n'
        f'max_batch_tokens = {batch_tokens}\ndtype = "{dtype}"\n'
    )
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BROKER_URL": REDIS,
        "FLEET_CONFIG_FILE": str(tmp / "tasks.toml"),
        "FLEET_STATE_DIR": str(tmp / "state"),
        "FLEET_BATCH_SIZE": str(batch_size),
        "FLEET_MAX_INFLIGHT_BATCHES": "8",
        "CUDA_VISIBLE_DEVICES": "" if gpu is None else str(gpu),
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
    from fleet.ops.workercommand import worker_argv

    procs = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    for k in range(workers):
        log = (tmp / f"worker{k}.log").open("wb")
        argv = worker_argv("intent", gpu=gpu, loglevel="WARNING", hostname=f"intent@b{k}.%h")
        wenv = {**env, "OMP_NUM_THREADS": str(threads)} if workers > 1 else env
        procs.append(subprocess.Popen(argv, env=wenv, stdout=log, stderr=log))
    try:
        # Let the workers load their model first: the ratio is about steady-state throughput.
        wait_workers(env, workers)
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


def celery_entry(root: Path | None = None) -> str:
    """The `celery -A` app of the code at `root` (this tree when None): a
    --baseline from before `fleet.ops.celeryapp` had its app in `wire.app`."""
    base = root or Path(__file__).resolve().parents[1]
    return "fleet.ops.celeryapp" if (base / "fleet/ops/celeryapp.py").is_file() else "wire.app"


def wait_workers(
    env: dict[str, str], n: int, timeout: float = 180, cwd: Path | None = None
) -> None:
    """Until `n` workers answer `celery inspect ping` (their model is loaded).

    Raises SystemExit naming the worker logs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ping = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                celery_entry(cwd),
                "inspect",
                "ping",
                "-t",
                "3",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        if ping.stdout.count("pong") >= n:
            return
        time.sleep(0.5)
    raise SystemExit(f"{n} worker(s) did not answer within {timeout:.0f}s; see the worker logs")


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
    ap.add_argument(
        "--gpu", type=int, help="run the model on this GPU (bare, pipelines and the fleet worker)"
    )
    ap.add_argument("--shape", choices=("minilm", "bert-base"), default="minilm")
    ap.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    ap.add_argument("--json-out", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)  # before torch is imported
    import torch

    device = "cuda" if args.gpu is not None else "cpu"
    items = texts(args.items)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = build_model(tmp / "model", args.shape)
        rates = {"bare": bare(model, items, args.batch_tokens, device, args.dtype)}
        rates["fleet"] = fleet(
            model,
            items,
            args.batch_size,
            args.batch_tokens,
            tmp,
            workers=args.workers,
            gpu=args.gpu,
            dtype=args.dtype,
        )
        rates["pipeline32"] = pipeline_rate(model, items, 32, device)
        if not args.skip_pipeline1:
            rates["pipeline1"] = pipeline_rate(
                model, items[: max(200, args.items // 5)], None, device
            )
    print(
        f"items={args.items} batch_size={args.batch_size} batch_tokens={args.batch_tokens} "
        f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} workers={args.workers} "
        f"device={device} shape={args.shape} dtype={args.dtype}"
    )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "shape": args.shape,
                    "dtype": args.dtype,
                    "device": device,
                    "items": args.items,
                    "rates": rates,
                    "fleet_over_bare": rates["fleet"] / rates["bare"],
                },
                indent=2,
            )
        )
    for k, v in rates.items():
        print(f"{k:12} {v:8.1f} items/s")
    print(f"fleet/bare        {rates['fleet'] / rates['bare']:.3f}")
    print(f"fleet/pipeline32  {rates['fleet'] / rates['pipeline32']:.2f}x")
    if "pipeline1" in rates:
        print(f"fleet/pipeline1   {rates['fleet'] / rates['pipeline1']:.2f}x")


if __name__ == "__main__":
    main()
