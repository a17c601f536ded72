"""One worker's batch path, stage by stage, in one process.

    .venv/bin/python -m bench.worker_path [--items 8192] [--rounds 4] [--cost-us 0]

A message of `--items` claimed items goes through `workers.batch.process`
exactly as in a worker (start, the pipeline of chunks: chunk start + inputs
read, the `fake` model, results written), against the local Postgres and Redis
(TEST_ADMIN_DATABASE_URL / TEST_REDIS_URL, default 127.0.0.1), without Celery.
Each round runs one message twice, interleaved: once with the heap frozen as a
worker freezes it after loading its model (`workers.device.freeze_heap`), once
thawed (every object back in the collector's generations, as before that).

Printed per variant (medians over rounds): items/s of the whole message, the
CPU this process spent per item (all its threads: what caps one worker, whose
Python runs one thread at a time, on a host with cores to spare), the
time in each stage per item (wall time of the thread that runs it: the reader
and writer threads overlap the model, so the stages add up to more than the
whole), and the garbage collector's time per message by generation.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.ceiling import ADMIN, REDIS, REPO, conversations, write_config

STAGES = ("start", "chunk start", "inputs", "model", "write")


class Clock:
    """Seconds per named stage and per GC generation, summed until `take()`."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._gc_started = 0.0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - start

        return timed

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.spent[f"gc{info['generation']}"] += time.perf_counter() - self._gc_started

    def take(self) -> dict[str, float]:
        out = dict(self.spent)
        self.spent.clear()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=8192, help="items in the message")
    ap.add_argument("--rounds", type=int, default=4, help="messages per variant")
    ap.add_argument("--cost-us", type=float, default=0.0, help="fake model cost per item")
    args = ap.parse_args()
    name = f"fleet_bench_worker_path_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = (ADMIN.rsplit("/", 1)[0] + "/" + name).replace("postgresql://", "postgresql+psycopg://")
    try:
        with tempfile.TemporaryDirectory() as d:
            figures = run(args, url, Path(d))
    finally:
        from db.engine import dispose_all
        from workers.state import stop_runtime

        stop_runtime()
        dispose_all()
        gc.unfreeze()
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(args, figures)


def run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, list[dict[str, float]]]:
    import subprocess

    from config.settings import Settings
    from db import ledger
    from db.engine import transaction
    from db.sources import ingest_conversations
    from wire.app import create_app
    from wire.messages import BatchMessage
    from workers import pipeline
    from workers.batch import BatchAttempt, process
    from workers.state import start_runtime

    config = write_config(tmp, args.cost_us / 1e6)
    env = {**os.environ, "DATABASE_URL": url, "FLEET_CONFIG_FILE": str(config)}
    subprocess.run(
        [sys.executable, "-m", "fleet.cli", "migrate"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    convs = conversations(args.items * args.rounds * 2)
    with transaction(url) as session:
        for k in range(0, len(convs), 5000):
            ingest_conversations(session, convs[k : k + 5000])
        ledger.discover(session, task="intent", source_kind="conversation")
    settings = Settings(
        database_url=url,
        broker_url=REDIS,
        config_file=config,
        state_dir=tmp / "state",
        log_level="WARNING",
    )
    clock = Clock()
    pipeline.ledger.start_batch = clock.wrap("start", pipeline.ledger.start_batch)
    pipeline.ledger.start_chunk = clock.wrap("chunk start", pipeline.ledger.start_chunk)
    pipeline.load_inputs = clock.wrap("inputs", pipeline.load_inputs)
    pipeline._run_model = clock.wrap("model", pipeline._run_model)
    pipeline._write = clock.wrap("write", pipeline._write)
    state = start_runtime(
        settings, "intent", hostname="bench@worker-path", app=create_app(settings)
    )
    gc.callbacks.append(clock.gc_callback)
    figures: dict[str, list[dict[str, float]]] = {"frozen": [], "thawed": []}
    try:
        for r in range(args.rounds):
            order = ["frozen", "thawed"] if r % 2 == 0 else ["thawed", "frozen"]
            for variant in order:
                gc.unfreeze()
                if variant == "frozen":
                    from workers.device import freeze_heap

                    freeze_heap()
                with transaction(url) as session:
                    (claimed,) = ledger.claim_batches(
                        session,
                        task="intent",
                        limit=args.items,
                        batch_size=args.items,
                        lease_seconds=settings.lease_seconds,
                    )
                msg = BatchMessage("intent", claimed.batch_id, claimed.item_ids)
                clock.take()
                start, cpu = time.perf_counter(), time.process_time()
                outcome = process(state, BatchAttempt(msg), hostname="bench@worker-path")
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                assert outcome.done == args.items, outcome
                figures[variant].append({"seconds": seconds, "cpu": cpu, **clock.take()})
                print(
                    f"  round {r + 1} {variant:6} {args.items / seconds:8,.0f} items/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        gc.callbacks.remove(clock.gc_callback)
    return figures


def report(args: argparse.Namespace, figures: dict[str, list[dict[str, float]]]) -> None:
    n = args.items

    def med(variant: str, key: str) -> float:
        return statistics.median(f.get(key, 0.0) for f in figures[variant])

    print(
        f"items={n} per message, rounds={args.rounds}, model cost {args.cost_us:g} us/item, "
        f"cpus={os.cpu_count()}"
    )
    print(
        f"{'':8} {'items/s':>9}  {'CPU':>8}  "
        + "  ".join(f"{s:>11}" for s in STAGES)
        + "   gc0/1/2 ms"
    )
    for variant in figures:
        rate = n / med(variant, "seconds")
        cpu = med(variant, "cpu") / n * 1e6
        stages = "  ".join(f"{med(variant, s) / n * 1e6:8.1f} us" for s in STAGES)
        gcs = "/".join(f"{med(variant, f'gc{g}') * 1e3:.0f}" for g in range(3))
        print(f"{variant:8} {rate:9,.0f}  {cpu:5.1f} us  {stages}   {gcs}")
    print(f"frozen/thawed {med('thawed', 'seconds') / med('frozen', 'seconds'):.2f}x")


if __name__ == "__main__":
    main()
