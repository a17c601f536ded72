"""The fleet's state in one read: the ledger (backlog by status, recent
throughput, the latest run), the broker (queue lengths, unacknowledged
messages) and the live workers' stats (`wire.stats`).

`fleet status`, `fleet watch` and `fleet metrics` all call `collect`, so they
can never disagree. A source that cannot be read (Postgres or Redis down) is
reported in `errors` and the rest is still returned: the exporter keeps
answering scrapes while a service restarts.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import ledger
from db.engine import transaction
from db.schema import STATUSES
from db.syncstate import SourceStatus, read_sources
from fleet.observe.cascade import CascadeStatus, cascade_statuses, read_model_seconds
from wire import keys
from wire.stats import WorkerStats, scan_workers

log = logging.getLogger(__name__)

ACTIVE = ("pending", "queued", "running")
# gone: the source row went away (fleet sync); parked: acknowledged failures (fleet park)
FINISHED = ("done", "failed", "dead", "parked", "gone")
RATE_WINDOW_S = 60.0
# Throughput reads at most this many of the newest results (a primary-key scan),
# so its cost stays bounded however fast the fleet goes: past the cap the window
# simply becomes the span those results cover.
RATE_SAMPLE_CAP = 50_000
# kombu's Redis transport keeps priority levels 3, 6, 9 in lists named
# `<queue>\x06\x16<priority>` beside the plain `<queue>` (priority 0).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"  # kombu's hash of delivered, not yet acknowledged messages
# Bounds on one ledger read, so a table that a migration or VACUUM FULL holds
# locked fails the read fast (the source shows as unreadable) instead of
# hanging `fleet status` and piling up waiting backends behind the exporter.
# Three statements at most: the read ends within about 3 x STATEMENT_TIMEOUT_S.
LOCK_TIMEOUT_S = 1.0
STATEMENT_TIMEOUT_S = 2.5


@dataclass
class TaskStatus:
    task: str
    counts: dict[str, int]
    queue_length: int | None = None  # messages (batches) waiting; None: broker unreadable
    items_per_second: float | None = None  # None: database unreadable
    workers: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return sum(self.counts.get(s, 0) for s in ACTIVE)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED)

    @property
    def eta_seconds(self) -> float | None:
        if self.remaining == 0:
            return 0.0
        if not self.items_per_second:
            return None
        return self.remaining / self.items_per_second

    def to_json(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {
            "counts": self.counts,
            "total": self.total,
            "remaining": self.remaining,
            "items_per_second": _round(self.items_per_second),
            "eta_seconds": _round(eta),
            "queue_length": self.queue_length,
            "workers": self.workers,
        }


@dataclass(frozen=True)
class RunInfo:
    id: int
    trigger: str
    task: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "trigger": self.trigger,
            "task": self.task,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "counts": self.counts,
        }


@dataclass
class FleetStatus:
    taken_at: float
    window_seconds: float
    tasks: dict[str, TaskStatus]
    workers: list[WorkerStats]
    unacked: int | None = None
    latest_run: RunInfo | None = None
    errors: dict[str, str] = field(default_factory=dict)  # source -> what went wrong
    sources: dict[str, SourceStatus] = field(default_factory=dict)  # [sources.*] synced
    # When the ledger figures shown were read (time.time()); older than taken_at
    # when this read failed and an earlier read's values are shown. None: none.
    ledger_read_at: float | None = None
    cascades: dict[str, CascadeStatus] = field(default_factory=dict)  # cheap task -> its cascade

    @property
    def ledger_age(self) -> float | None:
        """Seconds between the ledger figures shown and this status (None: none shown)."""
        if self.ledger_read_at is None:
            return None
        return max(0.0, self.taken_at - self.ledger_read_at)

    @property
    def done(self) -> bool:
        """Nothing pending, queued or running (and the ledger was readable)."""
        return "database" not in self.errors and all(t.remaining == 0 for t in self.tasks.values())

    def last_seen(self, w: WorkerStats) -> float:
        return max(0.0, self.taken_at - w.updated_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": dt.datetime.fromtimestamp(self.taken_at, dt.UTC).isoformat(),
            "window_seconds": self.window_seconds,
            "done": self.done,
            "tasks": {name: t.to_json() for name, t in self.tasks.items()},
            "workers": [worker_json(w, self.last_seen(w)) for w in self.workers],
            "unacked_messages": self.unacked,
            "latest_run": self.latest_run.to_json() if self.latest_run else None,
            "errors": self.errors,
            "sources": {name: src.to_json() for name, src in self.sources.items()},
            "ledger_age_seconds": _round(self.ledger_age),
            "cascades": {name: c.to_json() for name, c in self.cascades.items()},
        }


def worker_json(w: WorkerStats, last_seen: float) -> dict[str, Any]:
    return {
        "worker": w.worker,
        "task": w.task,
        "tier": w.tier,
        "model": w.model,
        "gpu": w.gpu,
        "device": w.device,
        "device_name": w.device_name,
        "pid": w.pid,
        "batches": w.batches,
        "messages": w.messages,
        "items_done": w.items_done,
        "items_failed": w.items_failed,
        "items_dead": w.items_dead,
        "ooms": w.ooms,
        "downshifts": w.downshifts,
        "step_ups": w.step_ups,
        "batch_seconds_sum": round(w.batch_seconds_sum, 3),
        "gpu_memory_allocated_bytes": w.gpu_memory_allocated,
        "gpu_memory_reserved_bytes": w.gpu_memory_reserved,
        "last_seen_seconds": round(last_seen, 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# -- ledger --------------------------------------------------------------------------


def throughput(session: Session, *, window: float, cap: int = RATE_SAMPLE_CAP) -> dict[str, float]:
    """Results written per second, per task, over the last `window` seconds.

    Each task's rate is its results in the window over the span they cover
    (from its oldest result in the window to now, at least 10 s and at most the
    window): a run that started 5 s ago is not diluted over a minute, and a run
    that finished decays to zero as its results leave the window.
    """
    rows = session.execute(
        text(
            """
            WITH recent AS (
                SELECT work_item_id, created_at FROM results ORDER BY id DESC LIMIT :cap
            )
            SELECT w.task, count(*) AS n,
                   extract(epoch FROM now() - min(r.created_at)) AS span
            FROM recent r JOIN work_items w ON w.id = r.work_item_id
            WHERE r.created_at > now() - make_interval(secs => :window)
            GROUP BY w.task
            """
        ),
        {"cap": cap, "window": window},
    ).all()
    floor = min(10.0, window)
    return {task: n / min(max(float(span), floor), window) for task, n, span in rows}


def latest_run(session: Session, *, task: str | None = None) -> RunInfo | None:
    """The newest `runs` row (for one task: the newest run that included it)."""
    where = "WHERE CAST(:task AS text) = ANY(string_to_array(task, ','))" if task else ""
    row = session.execute(
        text(
            f"SELECT id, trigger, task, started_at, finished_at, counts FROM runs {where} "
            "ORDER BY id DESC LIMIT 1"
        ),
        {"task": task},
    ).first()
    if row is None:
        return None
    return RunInfo(row.id, row.trigger, row.task, row.started_at, row.finished_at, row.counts)


@dataclass(frozen=True)
class LedgerRead:
    """The ledger's part of a status: counts by task and status, results per
    second by task, the latest run, when they were read (time.time()) and the
    declared sources' sync state."""

    counts: dict[str, dict[str, int]]
    rates: dict[str, float]
    run: RunInfo | None
    read_at: float
    sources: dict[str, SourceStatus] = field(default_factory=dict)


def bound_reads(session: Session) -> None:
    """Bound every statement of this transaction: a lock waited on at most
    LOCK_TIMEOUT_S, a statement run at most STATEMENT_TIMEOUT_S."""
    session.execute(
        text(
            "SELECT set_config('lock_timeout', :lock, true), "
            "set_config('statement_timeout', :statement, true)"
        ),
        {
            "lock": f"{int(LOCK_TIMEOUT_S * 1000)}ms",
            "statement": f"{int(STATEMENT_TIMEOUT_S * 1000)}ms",
        },
    )


def read_ledger(url: str, only: str | None, window: float) -> LedgerRead:
    """One ledger read, bounded: each statement waits at most LOCK_TIMEOUT_S for
    a lock and runs at most STATEMENT_TIMEOUT_S (Postgres `lock_timeout`,
    `statement_timeout`, set for this transaction only). Raises what the
    database raises (sqlalchemy OperationalError on a timeout)."""
    read_at = time.time()
    with transaction(url) as session:
        bound_reads(session)
        counts = ledger.counts(session, task=only)
        rates = throughput(session, window=window)
        run = latest_run(session, task=only)
        sources = read_sources(session)
    return LedgerRead(counts, rates, run, read_at, sources)


# -- broker --------------------------------------------------------------------------


def queue_keys(task: str) -> list[str]:
    """The Redis lists holding a task's waiting messages, one per priority level."""
    queue = keys.task_queue(task)
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def queue_lengths(client: redis.Redis, tasks: Iterable[str]) -> tuple[dict[str, int], int]:
    """({task: messages waiting in its queue, all priorities}, unacknowledged messages)."""
    names = list(tasks)
    with client.pipeline(transaction=False) as pipe:
        for task in names:
            for key in queue_keys(task):
                pipe.llen(key)
        pipe.hlen(UNACKED_KEY)
        replies = pipe.execute()
    per = len(PRIORITY_STEPS)
    lengths = {t: int(sum(replies[i * per : (i + 1) * per])) for i, t in enumerate(names)}
    return lengths, int(replies[-1])


# -- all together ----------------------------------------------------------------------


def secrets_of(urls: Iterable[str | None]) -> list[str]:
    """Passwords inside URLs, so error messages can be scrubbed of them."""
    out = []
    for url in urls:
        if url and "://" in url:
            try:
                password = urlsplit(url).password
            except ValueError:
                continue
            if password:
                out += [password, unquote(password)]
    return out


def scrub(message: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        message = message.replace(s, "***")
    return message


def _describe(exc: BaseException, secrets: Sequence[str]) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return scrub(f"{type(exc).__name__}: {first}", secrets)


def collect(
    db_url: str,
    client: redis.Redis,
    *,
    tasks: Sequence[str] = (),
    only: str | None = None,
    window: float = RATE_WINDOW_S,
    broker_url: str | None = None,
    ledger_reader: Callable[[str, str | None, float], LedgerRead] = read_ledger,
    last_ledger: LedgerRead | None = None,
    cascades: Mapping[str, str] | None = None,
) -> FleetStatus:
    """Read the whole status. `tasks` are the configured task names (shown even
    with no work items yet); `only` restricts everything to one task.

    `ledger_reader` reads the ledger (read_ledger: bounded by lock and
    statement timeouts). When it fails, the source is in `errors` and
    `last_ledger` (an earlier read of the same `only`), if given, supplies the
    figures, with their age in `ledger_age`. `cascades` ({cheap task: stronger
    task}, fleet.observe.cascade.configured_cascades) adds each cascade's share
    and cost (`cascades`); its model time is None when it could not be read."""
    secrets = secrets_of([db_url, broker_url])
    st = FleetStatus(time.time(), window, {}, [])
    got: LedgerRead | None = None
    try:
        got = ledger_reader(db_url, only, window)
    except Exception as e:
        st.errors["database"] = _describe(e, secrets)
        got = last_ledger
    counts = got.counts if got else {}
    rates = got.rates if got else {}
    if got is not None:
        st.latest_run, st.ledger_read_at = got.run, got.read_at
        st.sources = got.sources
    try:
        st.workers = [w for w in scan_workers(client) if only is None or w.task == only]
    except (redis.RedisError, OSError) as e:
        st.errors["broker"] = _describe(e, secrets)
    names = {only} if only else {*tasks, *counts, *(w.task for w in st.workers)}
    for name in sorted(names):
        c = counts.get(name, {})
        st.tasks[name] = TaskStatus(
            name,
            {s: int(c.get(s, 0)) for s in STATUSES},
            items_per_second=None if got is None else rates.get(name, 0.0),
            workers=sum(1 for w in st.workers if w.task == name),
        )
    if cascades and got is not None:
        pairs = {t: s for t, s in cascades.items() if only is None or only in (t, s)}
        st.cascades = cascade_statuses(pairs, counts, _model_seconds(db_url, pairs.values()))
    if "broker" not in st.errors:
        try:
            lengths, st.unacked = queue_lengths(client, st.tasks)
            for name, n in lengths.items():
                st.tasks[name].queue_length = n
        except (redis.RedisError, OSError) as e:
            st.errors["broker"] = _describe(e, secrets)
    return st


def _model_seconds(url: str, tasks: Iterable[str]) -> dict[str, float] | None:
    """The tasks' model seconds (fleet.observe.cascade), bounded; None when unreadable."""
    try:
        with transaction(url) as session:
            bound_reads(session)
            return read_model_seconds(session, tasks)
    except Exception as e:  # a cascade's cost is shown as unknown; the rest of status stands
        log.warning("cascade model time unreadable: %s", str(e).splitlines()[0] if str(e) else e)
        return None


def configured_tasks(config_file: Path | None) -> list[str]:
    """Task names from the task config, or none when it cannot be read (the
    ledger and the workers still name every task that has work)."""
    from config.taskconfig import ConfigError, load_tasks

    try:
        return sorted(load_tasks(config_file))
    except (ConfigError, OSError):
        return []
