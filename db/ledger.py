"""The work ledger: every query that moves a work item between states.

Each function takes a Session and runs inside the caller's transaction.
State changes are status-guarded (`... WHERE status = ... AND batch_id = ...`)
so a late, duplicated or redelivered message can never undo newer work.

    pending -> queued (claim) -> running (start_batch, or start_chunk for each
               chunk of a large batch as the worker takes it up) -> done | failed
    queued/running with an expired lease -> pending (reconcile) | dead
    running, delivered again after a worker died -> split in halves | dead
    failed | dead -> parked (park: acknowledged, never run again) -> pending (retry)

Statements that change a known list of items (start, chunk start, finish,
split, dead) find their rows by primary key, whatever the statistics say.
Written plainly (`WHERE id = ANY(:ids) AND batch_id = :b AND status ...`),
the planner, with statistics from a settled backlog (nothing in flight),
rates the partial lease index as nearly empty and walks every in-flight row
of every batch with the id list as a filter: 40,000 rows visited per 1,024
updated (bench.ledger). Two things rule that out, in custom and generic
plans alike: the guard is wrapped as `(batch_id = :b AND status ...) IS
TRUE`, which no index and no partial-index predicate matches, and the ids
come from `ARRAY(SELECT unnest(:ids))`, an array the planner sizes at ten
elements, so the primary-key probes also beat a sequential scan on a table of
any size. The statements that read or renew a whole batch (a start by
chunk, the heartbeat) wrap their status test the same way, so they read the
batch's rows through ix_work_items_batch, not every in-flight row through the
lease index. tests/integration/test_ledger_plans.py pins the plans.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, text
from sqlalchemy.orm import Session

from db.schema import Status


def id_array(ids: Iterable[int]) -> str:
    """A Postgres array literal (`{1,2,3}`) for a `CAST(:ids AS bigint[])` parameter.

    Built with one str.join (C speed): psycopg dumps a Python list element by
    element in Python, about 0.55 us of CPU per id against 0.10 us for this,
    and the hot paths pass every item's id two or three times (claim, start,
    finish; bench.ceiling prints the CPU per item). Every id goes through
    int(), so the literal only ever holds integers; something that is not one
    raises TypeError or ValueError.
    """
    return "{" + ",".join(map(str, map(int, ids))) + "}"


def _rowcount(result: Any) -> int:
    """Rows an UPDATE/INSERT touched (a CursorResult's rowcount; -1 means unknown)."""
    count = result.rowcount if isinstance(result, CursorResult) else -1
    return max(count, 0)


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: str
    item_ids: tuple[int, ...]


@dataclass(frozen=True)
class StartedItem:
    item_id: int
    source_kind: str
    source_id: int
    deliveries_before: int  # > 0: a worker already started this item and never finished it


@dataclass(frozen=True)
class Outcome:
    """What the worker made of one item. `result` is a results-row dict without
    work_item_id; `error` marks the item failed (a result may still be kept, e.g.
    an LLM's raw invalid output)."""

    item_id: int
    result: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class FinishCounts:
    done: int
    failed: int
    skipped: int  # no longer leased to this batch (finished before, or reclaimed)


def discover(session: Session, *, task: str, source_kind: str, limit: int | None = None) -> int:
    """Insert a pending work item for every source of this kind that has none for
    the task. One statement; the unique key makes concurrent discovery safe."""
    table, size = {
        "conversation": ("conversations", "octet_length(s.messages::text)"),
        "audio": ("audio_files", "COALESCE(round(s.duration_s * 100), 0)"),
    }[source_kind]
    limit_sql = "LIMIT :limit" if limit is not None else ""
    result = session.execute(
        text(
            f"""
            INSERT INTO work_items (source_kind, source_id, task, status, size_hint)
            SELECT CAST(:kind AS varchar), s.id, CAST(:task AS varchar), 'pending', {size}
            FROM {table} s
            WHERE s.gone_at IS NULL  -- gone from its sync source (db.sync)
              AND NOT EXISTS (
                SELECT 1 FROM work_items w
                WHERE w.source_kind = CAST(:kind AS varchar) AND w.source_id = s.id
                  AND w.task = CAST(:task AS varchar)
            )
            ORDER BY s.id
            {limit_sql}
            ON CONFLICT ON CONSTRAINT uq_work_items_source_task DO NOTHING
            """
        ),
        {"kind": source_kind, "task": task, "limit": limit},
    )
    return _rowcount(result)


def claimable(session: Session, *, task: str, source_kind: str) -> tuple[int, int]:
    """(pending items, sources with no item yet) for a task: what an enqueue would take."""
    table = {"conversation": "conversations", "audio": "audio_files"}[source_kind]
    pending = session.execute(
        text("SELECT count(*) FROM work_items WHERE task = :t AND status = 'pending'"),
        {"t": task},
    ).scalar_one()
    undiscovered = session.execute(
        text(
            f"""
            SELECT count(*) FROM {table} s
            WHERE s.gone_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM work_items w
                WHERE w.task = CAST(:t AS varchar) AND w.source_kind = CAST(:k AS varchar)
                  AND w.source_id = s.id
            )
            """
        ),
        {"t": task, "k": source_kind},
    ).scalar_one()
    return int(pending), int(undiscovered)


def add_items(session: Session, *, task: str, source_kind: str, source_ids: Sequence[int]) -> int:
    """Create pending items for given sources (e.g. the intent task on a fresh transcript)."""
    if not source_ids:
        return 0
    result = session.execute(
        text(
            """
            INSERT INTO work_items (source_kind, source_id, task, status)
            SELECT CAST(:kind AS varchar), sid, CAST(:task AS varchar), 'pending'
            FROM unnest(CAST(:ids AS bigint[])) AS sid
            ON CONFLICT ON CONSTRAINT uq_work_items_source_task DO NOTHING
            """
        ),
        {"kind": source_kind, "task": task, "ids": id_array(source_ids)},
    )
    return _rowcount(result)


def claim_batches(
    session: Session, *, task: str, limit: int, batch_size: int, lease_seconds: int
) -> list[ClaimedBatch]:
    """Move up to `limit` pending items to queued, cut into batches of `batch_size`.

    `FOR UPDATE SKIP LOCKED` lets any number of producers claim at once without
    ever claiming the same item twice. Items are taken in size order, so each
    batch holds similar lengths.

    Two steps in the caller's transaction: lock the ids in size order, then
    update each batch by primary key (one statement per batch, sent in one
    pipelined executemany). The rows are locked, so every one of them is
    updated. A single UPDATE joined to the locked set would leave the join to
    the planner, which hashes the whole table on every claim (or, with stale
    statistics, does far worse).
    """
    if limit <= 0:
        return []
    # The locked ids come back as one array (one value to decode, not a row each).
    locked = session.execute(
        text(
            """
            SELECT array_agg(id ORDER BY size_hint, id) FROM (
                SELECT id, size_hint FROM work_items
                WHERE task = :task AND status = 'pending'
                ORDER BY size_hint, id
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            ) locked
            """
        ),
        {"task": task, "limit": limit},
    ).scalar_one()
    ids: list[int] = locked or []
    batches = [
        ClaimedBatch(str(uuid.uuid4()), tuple(sorted(ids[i : i + batch_size])))
        for i in range(0, len(ids), batch_size)
    ]
    if batches:
        session.execute(
            text(
                """
                UPDATE work_items
                SET status = 'queued',
                    batch_id = CAST(:batch AS uuid),
                    attempts = attempts + 1,
                    lease_until = now() + make_interval(secs => :lease),
                    updated_at = now()
                WHERE id = ANY(CAST(:ids AS bigint[]))
                """
            ),
            [
                {"batch": b.batch_id, "ids": id_array(b.item_ids), "lease": lease_seconds}
                for b in batches
            ],
        )
    return batches


def start_batch(
    session: Session,
    *,
    batch_id: str,
    item_ids: Sequence[int],
    worker: str,
    lease_seconds: int,
    resume: bool = False,
    by_chunk: bool = False,
) -> list[StartedItem]:
    """Mark running the items still leased to this batch, renewing their lease.

    Items already finished, or reclaimed into another batch after their lease
    expired, are not returned: the worker skips them, so a redelivered or stale
    message changes nothing.

    Each start counts a delivery; `deliveries_before` (starts that never
    finished) is what poison isolation reads. With `resume`, the previous start
    ended in a transient error in a worker that lived, not a crash: this start
    takes its place instead of adding one.

    With `by_chunk`, this start only reads the rows still leased to the batch
    (one index scan): the worker starts each chunk of a large batch as it takes
    it up (`start_chunk`). A worker that dies then makes suspects of the chunks
    it had taken up, not of the whole batch, and each item's row is written
    once on the way to running instead of twice. Rows whose claim lease has
    less than half of `lease_seconds` left (the message waited long in the
    queue) get a fresh lease here; the heartbeat, beating every quarter lease
    at most, keeps the rest alive until their chunk is taken up.
    """
    if by_chunk:
        session.execute(
            text(
                """
                UPDATE work_items SET lease_until = now() + make_interval(secs => :lease)
                WHERE batch_id = CAST(:batch AS uuid)  -- by the batch index
                  AND (status = 'queued'
                       AND lease_until < now() + make_interval(secs => :lease / 2.0)) IS TRUE
                """
            ),
            {"batch": batch_id, "lease": lease_seconds},
        )
        rows = session.execute(
            text(
                """
                SELECT id, source_kind, source_id, deliveries FROM work_items
                WHERE batch_id = CAST(:batch AS uuid)  -- by the batch index
                  AND (status IN ('queued', 'running')) IS TRUE
                """
            ),
            {"batch": batch_id},
        ).all()
        wanted = set(item_ids)
        return sorted((StartedItem(*r) for r in rows if r[0] in wanted), key=lambda s: s.item_id)
    rows = session.execute(
        text(
            """
            UPDATE work_items w
            SET status = 'running',
                deliveries = GREATEST(w.deliveries + :inc, 1),
                worker = :worker,
                lease_until = now() + make_interval(secs => :lease),
                updated_at = now()
            WHERE w.id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND (w.batch_id = CAST(:batch AS uuid)
                   AND w.status IN ('queued', 'running')) IS TRUE  -- by primary key
            RETURNING w.id, w.source_kind, w.source_id, w.deliveries - 1
            """
        ),
        {
            "ids": id_array(item_ids),
            "batch": batch_id,
            "worker": worker,
            "lease": lease_seconds,
            "inc": 0 if resume else 1,
        },
    ).all()
    return sorted((StartedItem(*r) for r in rows), key=lambda s: s.item_id)


def start_chunk(
    session: Session, *, batch_id: str, item_ids: Sequence[int], worker: str, lease_seconds: int
) -> set[int]:
    """Start one chunk of a batch begun with `start_batch(by_chunk=True)`, as the
    worker takes the chunk up: rows still leased to this batch become running
    under `worker` with a fresh lease, and count a delivery. Returns the ids
    started (the others finished or were reclaimed meanwhile: skip them)."""
    rows = session.execute(
        text(
            """
            UPDATE work_items
            SET status = 'running', deliveries = deliveries + 1, worker = :worker,
                lease_until = now() + make_interval(secs => :lease), updated_at = now()
            WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND (batch_id = CAST(:batch AS uuid)
                   AND status IN ('queued', 'running')) IS TRUE  -- by primary key
            RETURNING id
            """
        ),
        {"ids": id_array(item_ids), "batch": batch_id, "worker": worker, "lease": lease_seconds},
    ).scalars()
    return set(rows)


def extend_lease(
    session: Session, *, batch_id: str, lease_seconds: int, worker: str | None = None
) -> int:
    """Heartbeat of a running batch (workers.heartbeat): renew the lease of its
    running rows, only those `worker` runs when given, and of its queued rows
    (chunks of a batch started by chunk, not yet taken up), so the reconciler
    never returns a live batch's items. Returns the number of rows renewed: 0
    means the batch is no longer this worker's (finished, or reclaimed while it
    was unreachable)."""
    result = session.execute(
        text(
            """
            UPDATE work_items SET lease_until = now() + make_interval(secs => :lease)
            WHERE batch_id = CAST(:batch AS uuid)  -- by the batch index
              AND (status = 'queued' OR (status = 'running'
                   AND (CAST(:worker AS text) IS NULL OR worker = :worker))) IS TRUE
            """
        ),
        {"batch": batch_id, "lease": lease_seconds, "worker": worker},
    )
    return _rowcount(result)


def _float(value: Any) -> Any:
    """JSON has no NaN or infinity: those travel as the strings Postgres reads
    them from ("NaN", "Infinity", "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _results_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array; a NaN inside scores or output names its item."""
    try:
        return json.dumps(rows, allow_nan=False)
    except ValueError:
        for r in rows:
            try:
                json.dumps([r["scores"], r["output"]], allow_nan=False)
            except ValueError:
                raise ValueError(
                    f"work item {r['work_item_id']}: its result's scores or output hold NaN "
                    "or infinity, which JSON cannot store; the adapter must replace them"
                ) from None
        raise


def finish_batch(session: Session, *, batch_id: str, outcomes: Sequence[Outcome]) -> FinishCounts:
    """Write a batch's results and final states in the caller's one transaction.

    Only rows still running under this batch change; results are written for
    exactly those rows (upsert on work_item_id), so finishing the same batch
    twice leaves one result per item.

    One statement: the done and failed state changes and the results insert
    are data-modifying CTEs, the results joined to the rows the updates
    touched. The results travel as one JSON document (one call of the C
    encoder, unpacked by json_to_recordset), not as nine parameter arrays, so
    a large batch's results are written at bulk speed (bench/producer.py);
    the model columns (name, revision, tier, device), the same for most of a
    batch, travel once per model and each row carries its model's number.

    Raises ValueError when a result's scores or output hold NaN or infinity.
    """
    ok = [o.item_id for o in outcomes if o.error is None]
    bad = [o for o in outcomes if o.error is not None]
    # The model columns are the same for a whole chunk (a few tiers at most,
    # after an out-of-memory step down): they travel once per model, and each
    # row names its model by number, so the JSON holds what differs per item.
    models: dict[tuple[Any, ...], int] = {}
    rows = []
    for o in outcomes:
        r = o.result
        if r is None:
            continue
        model = (r["model_name"], r.get("model_revision"), r["model_tier"], r["device"])
        rows.append(
            {
                "work_item_id": o.item_id,
                "label": r.get("label"),
                "confidence": _float(r["confidence"]),
                "scores": r.get("scores"),
                "output": r.get("output"),
                "latency_ms": _float(r["latency_ms"]),
                "m": models.setdefault(model, len(models) + 1),
            }
        )
    names, revisions, tiers, devices = (
        (list(c) for c in zip(*models, strict=True)) if models else ([], [], [], [])
    )
    done, failed = session.execute(
        text(
            """
            WITH done AS (
                UPDATE work_items
                SET status = 'done', lease_until = NULL, last_error = NULL, updated_at = now()
                WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ok AS bigint[]))))
                  AND (batch_id = CAST(:batch AS uuid) AND status = 'running') IS TRUE
                RETURNING id
            ), failed AS (
                UPDATE work_items w
                SET status = 'failed', lease_until = NULL, last_error = e.err,
                    updated_at = now()
                FROM unnest(CAST(:bad AS bigint[]), CAST(:errs AS text[])) AS e(id, err)
                WHERE w.id = e.id
                  AND w.id = ANY(ARRAY(SELECT unnest(CAST(:bad AS bigint[]))))
                  AND (w.batch_id = CAST(:batch AS uuid) AND w.status = 'running') IS TRUE
                RETURNING w.id
            ), written AS (
                INSERT INTO results (work_item_id, label, confidence, scores, output,
                                     model_name, model_revision, model_tier, device, latency_ms)
                SELECT r.work_item_id, r.label, r.confidence, r.scores, r.output,
                       m.model_name, m.model_revision, m.model_tier, m.device, r.latency_ms
                FROM json_to_recordset(CAST(:rows AS json)) AS r(
                    work_item_id bigint, label varchar, confidence float8, scores jsonb,
                    output jsonb, latency_ms float8, m int)
                JOIN unnest(CAST(:names AS varchar[]), CAST(:revisions AS varchar[]),
                            CAST(:tiers AS int[]), CAST(:devices AS varchar[]))
                     WITH ORDINALITY AS m(model_name, model_revision, model_tier, device, k)
                  ON m.k = r.m
                WHERE r.work_item_id IN (SELECT id FROM done UNION ALL SELECT id FROM failed)
                ON CONFLICT (work_item_id) DO UPDATE SET
                    label = EXCLUDED.label, confidence = EXCLUDED.confidence,
                    scores = EXCLUDED.scores, output = EXCLUDED.output,
                    model_name = EXCLUDED.model_name, model_revision = EXCLUDED.model_revision,
                    model_tier = EXCLUDED.model_tier,
                    device = EXCLUDED.device, latency_ms = EXCLUDED.latency_ms,
                    created_at = now()
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM failed)
            """
        ),
        {
            "ok": id_array(ok),
            "bad": id_array(o.item_id for o in bad),
            "errs": [o.error for o in bad],
            "batch": batch_id,
            "rows": _results_json(rows),
            "names": names,
            "revisions": revisions,
            "tiers": tiers,
            "devices": devices,
        },
    ).one()
    return FinishCounts(done=done, failed=failed, skipped=len(outcomes) - done - failed)


def split_batch(
    session: Session,
    *,
    batch_id: str,
    parts: Sequence[Sequence[int]],
    lease_seconds: int,
    reset_deliveries: bool,
    start_counted: bool = True,
) -> list[ClaimedBatch]:
    """Re-batch a suspected poison batch into parts with fresh batch ids
    (see `workers.policy.poison_plan` for when and how).

    Attempts restart at zero, so innocent neighbours of a poison item do not
    use up their attempts while it is being isolated. The start that decided
    the split ran nothing, so when it counted a delivery (`start_counted`) that
    one is taken off: deliveries keep counting worker deaths only
    (`reset_deliveries` sets them to zero). Rows of a batch started by chunk
    may still be queued (never taken up): those are split too.
    """
    out: list[ClaimedBatch] = []
    for part in parts:
        new_id = str(uuid.uuid4())
        ids = session.execute(
            text(
                """
                UPDATE work_items
                SET status = 'queued', batch_id = CAST(:new AS uuid), attempts = 0,
                    deliveries = CASE WHEN :reset THEN 0
                                      ELSE greatest(deliveries - :uncount, 0) END,
                    lease_until = now() + make_interval(secs => :lease), updated_at = now()
                WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
                  AND (batch_id = CAST(:old AS uuid)
                       AND status IN ('queued', 'running')) IS TRUE  -- by primary key
                RETURNING id
                """
            ),
            {
                "new": new_id,
                "old": batch_id,
                "ids": id_array(part),
                "lease": lease_seconds,
                "reset": reset_deliveries,
                "uncount": 1 if start_counted else 0,
            },
        ).scalars()
        got = tuple(sorted(ids))
        if got:
            out.append(ClaimedBatch(new_id, got))
    return out


def mark_dead(session: Session, *, batch_id: str, item_ids: Sequence[int], reason: str) -> int:
    result = session.execute(
        text(
            """
            UPDATE work_items
            SET status = 'dead', lease_until = NULL, last_error = :reason, updated_at = now()
            WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND (batch_id = CAST(:batch AS uuid) AND status = 'running') IS TRUE
            """
        ),
        {"ids": id_array(item_ids), "batch": batch_id, "reason": reason},
    )
    return _rowcount(result)


def reconcile(session: Session, *, max_attempts: int, task: str | None = None) -> dict[str, int]:
    """Return expired leases to pending; past the attempt limit, mark dead.

    This is what makes a lost Redis message or a killed worker harmless: the
    ledger, not the broker, knows what is unfinished. Only items a worker
    started (running) count against the limit: a queued item whose lease
    expired was never taken (workers down or busy, its message lost with
    Redis), which is not the item's fault, so that claim is not counted.
    """
    task_sql = "AND task = :task" if task else ""
    params = {"max": max_attempts, "task": task}
    dead = _rowcount(
        session.execute(
            text(
                f"""
            UPDATE work_items
            SET status = 'dead', lease_until = NULL, updated_at = now(),
                last_error = 'started by a worker ' || attempts || ' times and never finished '
                             '(the worker was lost each time, or the batch outlasted '
                             'FLEET_LEASE_SECONDS); `fleet retry --status dead` puts it back'
            WHERE status = 'running' AND lease_until < now()
              AND attempts >= :max {task_sql}
            """
            ),
            params,
        )
    )
    returned = _rowcount(
        session.execute(
            text(
                f"""
            UPDATE work_items
            SET status = 'pending', batch_id = NULL, lease_until = NULL, updated_at = now(),
                attempts = CASE WHEN status = 'queued' THEN greatest(attempts - 1, 0)
                                ELSE attempts END
            WHERE status IN ('queued', 'running') AND lease_until < now()
              AND (status = 'queued' OR attempts < :max) {task_sql}
            """
            ),
            params,
        )
    )
    return {"returned": returned, "dead": dead}


def retry(session: Session, *, statuses: Sequence[str], task: str | None = None) -> int:
    """Put failed, dead or parked items back to pending with fresh attempt counts.

    Raises ValueError for another status."""
    allowed = {Status.FAILED.value, Status.DEAD.value, Status.PARKED.value}
    if not set(statuses) <= allowed:
        raise ValueError(f"retry takes statuses from {sorted(allowed)}, got {list(statuses)}")
    task_sql = "AND task = :task" if task else ""
    result = session.execute(
        text(
            f"""
            UPDATE work_items
            SET status = 'pending', attempts = 0, deliveries = 0, batch_id = NULL,
                lease_until = NULL, updated_at = now()
            WHERE status = ANY(CAST(:statuses AS text[])) {task_sql}
            """
        ),
        {"statuses": list(statuses), "task": task},
    )
    return _rowcount(result)


def park(
    session: Session,
    *,
    statuses: Sequence[str],
    task: str | None = None,
    item_ids: Sequence[int] = (),
) -> int:
    """Acknowledge failed/dead items that will never succeed: status -> parked.

    Their last_error stays (the reason is still shown), and updated_at is left
    as it was: parking is not work, so the run that failed the item still
    reports it. `item_ids` (empty: every one) narrows to those work items.
    Returns the items parked; raises ValueError for a status other than
    failed or dead."""
    allowed = {Status.FAILED.value, Status.DEAD.value}
    if not statuses or not set(statuses) <= allowed:
        raise ValueError(f"park takes statuses from {sorted(allowed)}, got {list(statuses)}")
    task_sql = "AND task = :task" if task else ""
    ids_sql = "AND id = ANY(CAST(:ids AS bigint[]))" if item_ids else ""
    result = session.execute(
        text(
            f"""
            UPDATE work_items
            SET status = 'parked', batch_id = NULL, lease_until = NULL
            WHERE status = ANY(CAST(:statuses AS text[])) {task_sql} {ids_sql}
            """
        ),
        {"statuses": list(statuses), "task": task, "ids": id_array(item_ids)},
    )
    return _rowcount(result)


def counts_since_run(
    session: Session, *, run_id: int, tasks: Sequence[str]
) -> dict[str, dict[str, int]]:
    """A run's own work: {task: {status: n}} of the items of `tasks` whose state
    changed (work_items.updated_at) since the run's started_at.

    Items another run or command touched meanwhile count too; items that failed
    before the run and were not taken up again do not."""
    out: dict[str, dict[str, int]] = {t: {} for t in tasks}
    for t, status, n in session.execute(
        text(
            """
            SELECT w.task, w.status, count(*)
            FROM work_items w, runs r
            WHERE r.id = :run AND w.updated_at >= r.started_at
              AND w.task = ANY(CAST(:tasks AS text[]))
            GROUP BY 1, 2 ORDER BY 1, 2
            """
        ),
        {"run": run_id, "tasks": list(tasks)},
    ):
        out.setdefault(t, {})[status] = n
    return out


def analyze(session: Session) -> None:
    """Refresh the planner's statistics of work_items.

    After a bulk change (a million items discovered and claimed) the statistics
    still describe the table as it was until autovacuum analyzes it (a minute
    later, or never where autovacuum is off), and the planner picks plans made
    for a small table: finish_batch then walks every queued lease instead of
    its own batch (3,000 instead of 20,000 rows/s in bench/producer.py).
    ANALYZE reads a fixed sample: about 0.3 s at a million items. Without
    ownership of the table Postgres skips it with a warning.
    """
    session.execute(text("ANALYZE work_items"))


def counts(session: Session, *, task: str | None = None) -> dict[str, dict[str, int]]:
    """{task: {status: n}} for every task (or one)."""
    task_sql = "WHERE task = :task" if task else ""
    out: dict[str, dict[str, int]] = {}
    for t, status, n in session.execute(
        text(
            f"SELECT task, status, count(*) FROM work_items {task_sql} GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        {"task": task},
    ):
        out.setdefault(t, {})[status] = n
    return out
