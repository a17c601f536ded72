"""The ledger's statements alone against the real Postgres: the backend CPU
each item costs, and how many items a second one worker connection moves.

    .venv/bin/python -m bench.ledger [--items 120000] [--messages 8192,1024]
                                     [--in-flight 40960] [--rounds 3]
                                     [--baseline GIT_REV [--baseline-schema REV]]

No Redis, no Celery, no model: one producer connection claims messages
(`claim_batches`) so that about `--in-flight` items stay claimed and not yet
finished, as a fleet's read-ahead keeps them, and one worker connection runs
each message the way workers/batch.py does: a message of at most
PIPELINE_CHUNK items is `start_batch` then `finish_batch`; a larger one is
`start_batch(by_chunk=True)`, then `start_chunk` and `finish_batch` per
`chunk_plan` chunk (the last one closes the batch, where the ledger takes
`last`). The "model" fails 1 % of the items (an error, no result) and gives
the rest a result with 8 scores, the shape finish_batch writes.

Postgres CPU per item is the CPU (user + system, /proc/<pid>/stat) of the two
backends (pg_backend_pid() of each connection), read around every call and
split by phase: claim (producer), start, chunk start, finish (worker). Items
are written straight into work_items (size_hint = hashint8(id) & 65535, so
size order is not heap order) and, where the schema has a work_queue, put in
its buckets; then `VACUUM ANALYZE`; none of it is counted. Each run is
checked: every item done or failed, one result per done item, no batch left
open. "HOT" is the share of work_items updates that were heap-only.

With `--baseline REV`, db/ledger.py at that git revision runs the same cases
in the same run, interleaved (the order flips each round), so before and after
see one machine; medians are printed with every round. The baseline runs in a
database of its own migrated to `--baseline-schema` (default 0010: the schema
before the batches and buckets of migration 0012), the current ledger in one
migrated to head. Postgres must be local
(its backends' /proc entries are read). TEST_ADMIN_DATABASE_URL names the
server (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from bench.ceiling import _proc_cpu
from bench.producer import ADMIN, REPO, checkout, load_ledger
from db import ledger
from workers.batch import PIPELINE_CHUNK, chunk_plan

PHASES = ("claim", "start", "chunk start", "finish")
LEASE_S = 900


@dataclass
class Measured:
    """One run: Postgres CPU microseconds per item by phase, items/s (wall,
    first claim to last finish), and the largest number of items in flight."""

    cpu_us: dict[str, float]
    items_per_s: float
    peak_in_flight: int
    hot_share: float = 0.0

    @property
    def total_us(self) -> float:
        return sum(self.cpu_us.values())


def _has_queue(c: psycopg.Connection[Any]) -> bool:
    return c.execute("SELECT to_regclass('work_queue') IS NOT NULL").fetchone() == (True,)


def seed(url: str, items: int) -> None:
    """A ledger of `items` pending items (not timed), analyzed as a settled backlog."""
    with psycopg.connect(url, autocommit=True) as c:
        queue = _has_queue(c)
        c.execute(
            "TRUNCATE results, work_items"
            + (", work_queue, batches" if queue else "")
            + " RESTART IDENTITY CASCADE"
        )
        c.execute(
            "INSERT INTO work_items (source_kind, source_id, task, status, size_hint) "
            "SELECT 'conversation', g, 'intent', 'pending', hashint8(g) & 65535 "
            "FROM generate_series(1, %s) g",
            (items,),
        )
        if queue:
            c.execute(ledger.bucket_sql("work_items"))
        c.execute("VACUUM ANALYZE work_items, results" + (", work_queue" if queue else ""))
        c.execute("SELECT pg_stat_force_next_flush()")


def _updates(url: str) -> tuple[int, int]:
    """(updates, heap-only updates) of work_items so far."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_stat_clear_snapshot()")
        got = c.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'work_items'"
        ).fetchone()
    assert got is not None
    return int(got[0]), int(got[1])


def outcomes(mod: ModuleType, ids: list[int]) -> list[ledger.Outcome]:
    """What a model makes of the items: 1 % fail, the rest get 8 scores."""
    out = []
    for i in ids:
        if i % 100 == 0:
            out.append(mod.Outcome(i, None, "simulated failure"))
            continue
        scores = {f"label{k}": (i * (k + 3) % 97) / 97 for k in range(8)}
        result = {
            "label": "label0",
            "confidence": scores["label0"],
            "scores": scores,
            "output": None,
            "latency_ms": 0.5,
            "model_name": "bench",
            "model_revision": "sha256:0",
            "model_tier": 0,
            "device": "cpu",
        }
        out.append(mod.Outcome(i, result))
    return out


class Backend:
    """One connection (a pool of one), its backend's pid and CPU seconds so far."""

    def __init__(self, url: str) -> None:
        sa_url = url.replace("postgresql://", "postgresql+psycopg://")
        self.engine = create_engine(sa_url, pool_size=1, max_overflow=0)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self.sessions.begin() as s:
            self.pid = int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def cpu(self) -> float:
        got = _proc_cpu(self.pid)
        if got is None:
            raise SystemExit(f"cannot read /proc/{self.pid}/stat: Postgres must run on this host")
        return got


def run(url: str, mod: ModuleType, *, items: int, size: int, in_flight: int) -> Measured:
    """Claim, start and finish every item with the ledger module `mod`."""
    seed(url, items)
    updates_before = _updates(url)
    closes = "last" in inspect.signature(mod.finish_batch).parameters
    producer, worker = Backend(url), Backend(url)
    cpu = dict.fromkeys(PHASES, 0.0)

    def timed(phase: str, b: Backend, call: Callable[..., Any], **kw: Any) -> Any:
        """call(session, **kw) in one transaction on `b`, its CPU added to `phase`."""
        before = b.cpu()
        with b.sessions.begin() as s:
            got = call(s, **kw)
        cpu[phase] += b.cpu() - before
        return got

    queue: deque[ledger.ClaimedBatch] = deque()
    claimed = peak = 0
    start = time.perf_counter()
    while claimed < items or queue:
        while claimed < items and sum(len(b.item_ids) for b in queue) + size <= max(
            in_flight, size
        ):
            queue.extend(
                timed(
                    "claim",
                    producer,
                    mod.claim_batches,
                    task="intent",
                    limit=size,
                    batch_size=size,
                    lease_seconds=LEASE_S,
                )
            )
            claimed += size
        peak = max(peak, sum(len(b.item_ids) for b in queue))
        msg = queue.popleft()
        by_chunk = len(msg.item_ids) > PIPELINE_CHUNK
        started: list[ledger.StartedItem] = timed(
            "start",
            worker,
            mod.start_batch,
            batch_id=msg.batch_id,
            item_ids=msg.item_ids,
            worker="bench",
            lease_seconds=LEASE_S,
            by_chunk=by_chunk,
        )
        plan = chunk_plan(len(started))
        for lo, hi in plan:
            part = [it.item_id for it in started[lo:hi]]
            if by_chunk:
                timed(
                    "chunk start",
                    worker,
                    mod.start_chunk,
                    batch_id=msg.batch_id,
                    item_ids=part,
                    worker="bench",
                    lease_seconds=LEASE_S,
                )
            timed(
                "finish",
                worker,
                mod.finish_batch,
                batch_id=msg.batch_id,
                outcomes=outcomes(mod, part),
                **({"last": hi == plan[-1][1]} if closes else {}),
            )
    wall = time.perf_counter() - start
    with worker.sessions.begin() as s:
        rows = s.execute(text("SELECT status, count(*) FROM work_items GROUP BY 1")).all()
        got = {str(k): int(v) for k, v in rows}
        results = s.execute(text("SELECT count(*) FROM results")).scalar_one()
        left = (
            s.execute(text("SELECT count(*) FROM batches")).scalar_one()
            if s.execute(text("SELECT to_regclass('batches') IS NOT NULL")).scalar_one()
            else 0
        )
    failed = items // 100
    if got != {"done": items - failed, "failed": failed} or results != items - failed or left:
        raise SystemExit(f"run left the ledger wrong: {got}, {results} results, {left} batches")
    producer.engine.dispose()
    worker.engine.dispose()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(0.6)  # the backends' statistics reach the shared counters
    upd, hot = (a - b for a, b in zip(_updates(url), updates_before, strict=True))
    return Measured(
        {p: cpu[p] / items * 1e6 for p in PHASES}, items / wall, peak, hot / upd if upd else 0.0
    )


def _rounds(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({', '.join(fmt.format(v) for v in values)})"


def report(args: argparse.Namespace, runs: dict[tuple[int, str], list[Measured]]) -> None:
    print(
        f"\nitems={args.items} in_flight<={args.in_flight} rounds={args.rounds} "
        f"baseline={args.baseline or '-'} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}"
    )
    print("Postgres CPU us/item: median (every round); items/s: median (every round)")
    for size in args.messages:
        for version in ("baseline", "current"):
            got = runs.get((size, version))
            if not got:
                continue
            phases = "  ".join(
                f"{p} {statistics.median(m.cpu_us[p] for m in got):.1f}" for p in PHASES
            )
            print(
                f"{size:>5}-item messages {version:8}  PG CPU {_rounds([m.total_us for m in got])}"
                f" us/item  [{phases}]  items/s {_rounds([m.items_per_s for m in got], '{:,.0f}')}"
                f"  peak in flight {max(m.peak_in_flight for m in got):,}"
                f"  HOT {statistics.median(m.hot_share for m in got):.0%}"
            )
        if (size, "baseline") in runs:
            before = statistics.median(m.total_us for m in runs[(size, "baseline")])
            after = statistics.median(m.total_us for m in runs[(size, "current")])
            print(f"{size:>5}-item messages current/baseline PG CPU per item {after / before:.2f}x")


def _on_cpu_ns(pid: int) -> int:
    """Time a process has spent on a CPU, in ns (/proc/<pid>/schedstat: finer
    than the clock ticks of /proc/<pid>/stat, for calls of a few milliseconds)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def counts_cost(
    url: str, mod: ModuleType, *, items: int, in_flight: int, calls: int
) -> list[float]:
    """Backend on-CPU ms of each of `calls` `mod.counts(session)` calls (what `fleet
    status`, `fleet backlog` and the metrics read) on a ledger of `items` items:
    a third done, `in_flight` claimed in 8,192-item batches (half of them
    started), the rest pending. Taken after `VACUUM ANALYZE`, as autovacuum
    keeps a live table."""
    seed(url, items)
    b = Backend(url)
    done = items // 3
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "UPDATE work_items SET status = 'done' WHERE id IN "
            "(SELECT id FROM work_items ORDER BY id LIMIT %s)",
            (done,),
        )
        if _has_queue(c):  # the done items leave their buckets
            c.execute("TRUNCATE work_queue")
            c.execute(ledger.bucket_sql("(SELECT * FROM work_items WHERE status = 'pending') p"))
    claimed: list[ledger.ClaimedBatch] = []
    while sum(len(x.item_ids) for x in claimed) < in_flight:
        with b.sessions.begin() as s:
            claimed += mod.claim_batches(
                s, task="intent", limit=8192, batch_size=8192, lease_seconds=LEASE_S
            )
    for x in claimed[: len(claimed) // 2]:
        with b.sessions.begin() as s:
            mod.start_batch(
                s, batch_id=x.batch_id, item_ids=x.item_ids, worker="bench", lease_seconds=LEASE_S
            )
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")
    out = []
    for _ in range(calls):
        before = _on_cpu_ns(b.pid)
        with b.sessions.begin() as s:
            got = mod.counts(s)
        out.append((_on_cpu_ns(b.pid) - before) / 1e6)
    states = got["intent"]
    if states.get("queued", 0) + states.get("running", 0) != len(claimed) * 8192:
        raise SystemExit(f"counts read the ledger wrong: {states}")
    b.engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=120_000)
    ap.add_argument(
        "--messages",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8192, 1024],
        help="message sizes, comma-separated",
    )
    ap.add_argument("--in-flight", type=int, default=40_960, help="items claimed ahead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="GIT_REV", help="also run db/ledger.py at this revision")
    ap.add_argument(
        "--baseline-schema",
        default="0010",
        metavar="REV",
        help="the Alembic revision the baseline's database is migrated to (default 0010)",
    )
    ap.add_argument(
        "--counts-items",
        type=int,
        default=0,
        metavar="N",
        help="instead: the CPU of ledger.counts on a ledger of N items, baseline and current",
    )
    args = ap.parse_args()
    if args.in_flight >= max(args.items, args.counts_items):
        raise SystemExit("--in-flight must be below --items")
    names = {v: f"fleet_bench_ledger_{v}_{os.getpid()}" for v in ("baseline", "current")}
    if not args.baseline:
        del names["baseline"]
    urls = {v: ADMIN.rsplit("/", 1)[0] + "/" + n for v, n in names.items()}
    runs: dict[tuple[int, str], list[Measured]] = {}
    try:
        from db.migrate import upgrade

        for version, url in urls.items():
            with psycopg.connect(ADMIN, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{names[version]}"')
            sa_url = url.replace("postgresql://", "postgresql+psycopg://")
            upgrade(sa_url, args.baseline_schema if version == "baseline" else "head")
        with tempfile.TemporaryDirectory() as d:
            mods: dict[str, ModuleType] = {"current": ledger}
            if args.baseline:
                root = checkout(args.baseline, Path(d) / "baseline")
                mods = {"baseline": load_ledger(root, "ledger_baseline"), **mods}
            order = list(mods)
            if args.counts_items:
                for version in order:
                    ms = counts_cost(
                        urls[version],
                        mods[version],
                        items=args.counts_items,
                        in_flight=args.in_flight,
                        calls=max(args.rounds, 5),
                    )
                    print(
                        f"ledger.counts, {args.counts_items:,} items, {args.in_flight:,} in "
                        f"flight, {version}: backend CPU ms {_rounds(ms)}"
                    )
                return
            for r in range(args.rounds):
                for size in args.messages:
                    for version in order if r % 2 == 0 else order[::-1]:
                        m = run(
                            urls[version],
                            mods[version],
                            items=args.items,
                            size=size,
                            in_flight=args.in_flight,
                        )
                        runs.setdefault((size, version), []).append(m)
                        print(
                            f"  round {r + 1} {size}-item {version}: {m.total_us:.1f} us/item "
                            f"{m.items_per_s:,.0f} items/s HOT {m.hot_share:.0%}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as c:
            for n in names.values():
                c.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
    report(args, runs)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
