"""The fleet's own ceiling: how fast it moves items when the model costs nothing,
or costs what a GPU encoder does, next to the bare model.

    .venv/bin/python -m bench.ceiling [--items 20000] [--workers 1,4] [--cost-us 0,50]
                                      [--baseline GIT_REV] [--rounds 3]

The `fake` model kind (workers/adapters/fake.py) sleeps `seconds_per_item` per
item, so the model's cost is exactly known:
  bare    the adapter alone in this process: prepare + predict over the same
          conversations, in token-budget sub-batches (what one worker's model
          time would be with nothing around it)
  fleet   ingest -> Postgres -> `fleet run` -> Redis -> N real `celery worker`
          processes -> results in Postgres; timed in the database from the run's
          start to the last result committed, workers already started
For each model cost and worker count it prints items/s, fleet/bare (bare for N
workers is N x the one-process rate: the ideal) and the scaling from 1 to N
workers. With `--baseline REV` the code at that revision runs the same fleet
cases in the same run (interleaved), so before and after see one machine;
`--rounds N` runs each case N times (the order flipped each round) and prints
the median, for a machine whose load varies.

Needs Postgres and Redis (TEST_ADMIN_DATABASE_URL / TEST_REDIS_URL, default
127.0.0.1). On a 2-core machine 4 workers share 2 cores with Postgres, Redis
and the driver: the scaling figure there says more about the cores than the fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.overhead import celery_entry, wait_workers
from bench.producer import checkout

REPO = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/13"

WORDS = "hello report deadline friend course happy goal weather document anxious".split()


def conversations(n: int) -> list[dict[str, object]]:
    """Short conversations (3 to 12 words), as the issue's measurements used."""
    return [
        {
            "external_id": f"k{i}",
            "messages": [
                {
                    "role": "user",
                    "content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 10)),
                }
            ],
        }
        for i in range(n)
    ]


def write_config(tmp: Path, cost_s: float) -> Path:
    model = tmp / "fake-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")  # the fake model loads nothing
    path = tmp / f"tasks-{cost_s}.toml"
    path.write_text(
        "include_bundled = false\n"
        "[tasks.intent]\n"
        'kind = "fake"\n'
        'source = "conversation"\n'
        f"seconds_per_item = {cost_s}\n"
        "[[tasks.intent.ladder]]\n"
        'name = "fake"\n'
        f'path = "{model}"\n'
        "max_length = 128\n"
        "max_batch_tokens = 1000000\n"
    )
    return path


def bare(convs: list[dict[str, object]], cost_s: float) -> float:
    """Items/s of the fake adapter alone (prepare + predict), one process."""
    from config.taskconfig import TierSpec
    from workers.adapters.base import Source
    from workers.adapters.fake import FakeAdapter
    from workers.policy import plan_batches

    a = FakeAdapter(seconds_per_item=cost_s)
    a.load(TierSpec(name="fake", path="", max_length=128), "", "cpu")
    srcs = [Source(i, "conversation", str(c["external_id"]), c) for i, c in enumerate(convs)]
    start = time.perf_counter()
    prepared = {s.item_id: a.prepare(s) for s in srcs}
    for plan in plan_batches([(i, p.cost) for i, p in prepared.items()], max_tokens=1_000_000):
        a.predict([prepared[i] for i in plan])
    return len(convs) / (time.perf_counter() - start)


CPU_PARTS = ("workers", "driver", "postgres", "redis")


@dataclass(frozen=True)
class Measured:
    """One fleet run: items/s, and CPU microseconds per item spent by each part
    (`CPU_PARTS`: all worker processes together, the `fleet run` driver less
    the CPU of a run with nothing to do (start-up, imports), every Postgres
    process, the Redis server; None where not readable here)."""

    items_per_s: float
    cpu_us: dict[str, float | None]


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used, from /proc; None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pids(name: str) -> list[int]:
    """Pids of the local processes whose command is `name` (postgres, redis-server)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == name:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def cpu_seconds(workers: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the worker processes (together), every local
    Postgres process and the local Redis server. A server on another host (or
    this machine without /proc) is left out. Backends that exit between two
    readings take their time with them; the benchmark's connections stay open
    for the run (a worker's pool, the driver's), so little is missed."""
    out: dict[str, float] = {}
    got = [_proc_cpu(p) for p in workers]
    if all(g is not None for g in got):
        out["workers"] = sum(g for g in got if g is not None)
    for part, comm in (("postgres", "postgres"), ("redis", "redis-server")):
        pids = _server_pids(comm)
        if pids:
            out[part] = sum(c for c in map(_proc_cpu, pids) if c is not None)
    return out


def fleet(
    root: Path,
    jsonl: Path,
    config: Path,
    tmp: Path,
    *,
    items: int,
    workers: int,
    tag: str,
    settings: dict[str, str] | None = None,
) -> Measured:
    """Items/s of the fleet whose code is at `root`, N workers, and the CPU
    each part spent per item (`cpu_seconds`; the driver from this process's
    reaped children)."""
    import redis

    name = f"fleet_ceiling_{os.getpid()}_{tag}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS).flushdb()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "DATABASE_URL": url,
        "BROKER_URL": REDIS,
        "FLEET_CONFIG_FILE": str(config),
        "FLEET_STATE_DIR": str(tmp / f"state-{tag}"),
        "FLEET_LOG_LEVEL": "WARNING",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": str(root),
        **(settings or {}),
    }
    fl = [sys.executable, "-m", "fleet.cli"]
    run = dict(env=env, check=True, capture_output=True, cwd=root)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([*fl, "migrate"], **run)  # type: ignore[call-overload]
        # The driver's fixed cost (Python start-up, imports, a run with nothing
        # to do), taken off its CPU per item below.
        idle = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([*fl, "run", "-t", "intent", "--json", "--timeout", "60"], **run)  # type: ignore[call-overload]
        idled = resource.getrusage(resource.RUSAGE_CHILDREN)
        fixed = (idled.ru_utime + idled.ru_stime) - (idle.ru_utime + idle.ru_stime)
        subprocess.run([*fl, "ingest", "conversations", str(jsonl)], **run)  # type: ignore[call-overload]
        entry = celery_entry(root)
        for k in range(workers):
            log = (tmp / f"worker-{tag}-{k}.log").open("wb")
            argv = [
                sys.executable,
                *("-m", "celery", "-A", entry, "worker", "--pool", "solo"),
                *("-Q", "fleet.intent", "-n", f"intent@bench{k}-{tag}.%h"),
                *("--loglevel", env["FLEET_LOG_LEVEL"], "--without-gossip", "--without-mingle"),
            ]
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=root))
        wait_workers(env, workers, cwd=root)
        time.sleep(1)
        before = cpu_seconds([w.pid for w in procs])
        driver = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([*fl, "run", "-t", "intent", "--json", "--timeout", "900"], **run)  # type: ignore[call-overload]
        driven = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = cpu_seconds([w.pid for w in procs])
        with psycopg.connect(url) as c:  # timed from the start of the last run (not the idle one)
            row = c.execute(
                "SELECT extract(epoch FROM (SELECT max(created_at) FROM results)"
                " - (SELECT max(started_at) FROM runs)), (SELECT count(*) FROM results)"
            ).fetchone()
        assert row is not None and row[1] == items, row
        spent = {k: (after[k] - before[k]) if k in before else None for k in after}
        spent["driver"] = max(
            0.0, (driven.ru_utime + driven.ru_stime) - (driver.ru_utime + driver.ru_stime) - fixed
        )
        us = {k: None if v is None else round(v / items * 1e6, 1) for k, v in spent.items()}
        return Measured(items / float(row[0]), us)
    finally:
        for w in procs:
            w.terminate()
        for w in procs:
            w.wait(timeout=60)
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def median_cpu(runs: list[Measured]) -> dict[str, float | None]:
    """Median CPU us per item of each part over rounds (None where not measured)."""
    out: dict[str, float | None] = {}
    for part in CPU_PARTS:
        got = [v for m in runs if (v := m.cpu_us.get(part)) is not None]
        out[part] = round(statistics.median(got), 1) if got else None
    return out


def cpu_line(cpu: dict[str, float | None]) -> str:
    """`workers 31.2 us  driver 4.0 us ...`, and the rate the worker processes'
    own CPU allows: a worker's Python runs one thread at a time (the GIL), so
    with the model free and a core to spare for everything else one worker
    cannot pass 1e6 / (its CPU us per item) items/s."""
    parts = "  ".join(f"{p} {'n/a' if cpu[p] is None else f'{cpu[p]:.1f} us'}" for p in CPU_PARTS)
    w = cpu.get("workers")
    return parts + (f"  (worker-CPU bound {1e6 / w:,.0f} items/s)" if w else "")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--workers", default="1,4", help="worker counts, comma-separated")
    ap.add_argument("--cost-us", default="0,50", help="model cost per item in microseconds")
    ap.add_argument("--baseline", metavar="GIT_REV", help="also run the code at this revision")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fleet runs per case and version, interleaved; the median is printed",
    )
    ap.add_argument("--json-out", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep the worker logs")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FLEET_X=V",
        help="a setting for every fleet case (e.g. FLEET_BATCH_SIZE=1024); repeatable",
    )
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    costs = [float(x) for x in args.cost_us.split(",")]
    convs = conversations(args.items)
    cases: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"items": args.items, "cpus": os.cpu_count(), "cases": cases}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.keep:
            tmp = args.keep
            tmp.mkdir(parents=True, exist_ok=True)
        jsonl = tmp / "c.jsonl"
        jsonl.write_text("".join(json.dumps(c) + "\n" for c in convs))
        roots = {"current": REPO}
        if args.baseline:
            roots = {"baseline": checkout(args.baseline, tmp / "baseline"), **roots}
        print(
            f"items={args.items} cpus={os.cpu_count()} baseline={args.baseline or '-'} "
            f"rounds={args.rounds}",
            flush=True,
        )
        for cost_us in costs:
            config = write_config(tmp, cost_us / 1e6)
            one = bare(convs, cost_us / 1e6)
            print(f"\nmodel cost {cost_us:g} us/item: bare {one:,.0f} items/s (one process)")
            for n in counts:
                runs: dict[str, list[Measured]] = {v: [] for v in roots}
                for r in range(args.rounds):
                    # interleaved, the order flipped each round: both versions see the same load
                    order = list(roots) if r % 2 == 0 else list(roots)[::-1]
                    for version in order:
                        runs[version].append(
                            fleet(
                                roots[version],
                                jsonl,
                                config,
                                tmp,
                                items=args.items,
                                workers=n,
                                tag=f"{version}-{cost_us:g}-{n}-{r}",
                                settings=dict(kv.split("=", 1) for kv in args.set),
                            )
                        )
                rates = {v: [m.items_per_s for m in ms] for v, ms in runs.items()}
                for version in roots:
                    rate = statistics.median(rates[version])
                    ratio = rate / (one * n)
                    cpu = median_cpu(runs[version])
                    cases.append(
                        {
                            "version": version,
                            "cost_us": cost_us,
                            "workers": n,
                            "items_per_s": round(rate, 1),
                            "rounds_items_per_s": [round(x, 1) for x in rates[version]],
                            "bare_items_per_s": round(one * n, 1),
                            "fleet_over_bare": round(ratio, 4),
                            "cpu_us_per_item": cpu,
                        }
                    )
                    each = ", ".join(f"{x:,.0f}" for x in rates[version])
                    print(
                        f"  {version:8} workers={n}  fleet {rate:9,.0f} items/s"
                        f"  fleet/bare {ratio:.3f}"
                        + (f"  (median of {each})" if args.rounds > 1 else ""),
                        flush=True,
                    )
                    print(f"           CPU per item: {cpu_line(cpu)}", flush=True)
                if "baseline" in rates:
                    cur = statistics.median(rates["current"])
                    base = statistics.median(rates["baseline"])
                    print(f"  current/baseline {cur / base:.2f}x", flush=True)
        for cost_us in costs:
            for version in roots:
                by_n = {
                    c["workers"]: c["items_per_s"]
                    for c in cases
                    if c["version"] == version and c["cost_us"] == cost_us
                }
                if 1 in by_n and len(by_n) > 1:
                    top = max(by_n)
                    print(
                        f"scaling {version} at {cost_us:g} us: {top} workers / 1 = "
                        f"{by_n[top] / by_n[1]:.2f}x"
                    )
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
