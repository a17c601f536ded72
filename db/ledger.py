"""The work ledger: every query that moves a work item between states.

Each function takes a Session and runs inside the caller's transaction.

    pending, in a work_queue bucket (discover, add_items, retry, reconcile, resets)
      -> claimed: a bucket's ids go into an open `batches` row (claim_batches);
         the item's row is not written
      -> started: the batch row counts the delivery, names the worker and takes
         the lease (start_batch; start_chunk moves `started_upto` as each chunk
         of a large batch is taken up); the item's row is not written
      -> done | failed: one update of the item's row, heap-only (no indexed column
         changes), and its result row (finish_batch); the last chunk closes the batch
    open batch past its lease -> its unfinished items queued again | dead (reconcile)
    started again after a worker died -> the deaths counted on the items of the
    chunks it had taken up, then split in parts | dead (workers.policy.poison_plan)
    failed | dead -> parked (park) -> pending (retry)

An item's row belongs to an open batch while it is pending and its
`updated_at` is not later than the batch's `created_at` (clock_timestamp() at
the claim): a reset (db.history) moves `updated_at` on, and the old batch can
neither start nor finish it any more. A finish locks its batch row, so it
either commits before the reconciler closes the batch or finds it gone.

Statements that read or change a known list of items find their rows by
primary key: the ids come from `ARRAY(SELECT unnest(:ids))`, an array the
planner sizes at ten elements, so the probes beat a sequential scan on a table
of any size (tests/integration/test_ledger_plans.py pins the plans).

Queue and claim: db.ledgerqueue; the values handed over: db.ledgerrows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from psycopg.errors import UniqueViolation
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.ledgercounts import analyze, counts, counts_since_run
from db.ledgerqueue import (
    BUCKET,
    add_items,
    bucket_sql,
    claim_batches,
    claimable,
    discover,
    enqueue,
    hold_queued,
    insert_batches,
    park,
    reconcile,
    retry,
    unqueue,
)
from db.ledgerrows import (
    RESULT_COLUMNS,
    ClaimedBatch,
    FinishCounts,
    Outcome,
    ResultRow,
    StartedItem,
    _rowcount,
    copy_text,
    id_array,
    result_rows,
    results_json,
)

__all__ = [
    "BUCKET",
    "ClaimedBatch",
    "FinishCounts",
    "Outcome",
    "ResultRow",
    "StartedItem",
    "_rowcount",
    "add_items",
    "analyze",
    "bucket_sql",
    "claim_batches",
    "claimable",
    "counts",
    "counts_since_run",
    "discover",
    "enqueue",
    "extend_lease",
    "finish_batch",
    "hold_queued",
    "id_array",
    "insert_batches",
    "unqueue",
    "mark_dead",
    "park",
    "reconcile",
    "retry",
    "split_batch",
    "start_batch",
    "start_chunk",
]

_LEASE = "now() + make_interval(secs => :lease)"


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
    """Start a batch: its row counts the delivery, names `worker` and takes a
    fresh lease; returns the items still its own (pending, not reset since the
    claim), in id order. None (the batch was finished, split, or closed by the
    reconciler): a stale or redelivered message, which changes nothing.

    A batch started before (deliveries > 0) whose worker died on it: every
    unfinished item of the chunks that start had taken up (id <= started_upto)
    gets a death counted (`deliveries`), which `deliveries_before` returns and
    poison isolation reads. With `resume`, the previous start ended in a
    transient error in a worker that lived, not a crash: nothing is counted.

    With `by_chunk`, no chunk is taken up yet (`start_chunk` takes each up as
    the worker's reader reaches it), so a worker that dies makes suspects of the
    chunks it had taken up, not of the whole batch. Otherwise the whole batch
    is taken up here. Nothing is written per item unless a death is counted.
    """
    row = session.execute(
        text(
            "SELECT deliveries, started_upto, created_at FROM batches "
            "WHERE batch_id = CAST(:batch AS uuid) FOR UPDATE"
        ),
        {"batch": batch_id},
    ).one_or_none()
    if row is None:
        return []
    deliveries, upto, created_at = row
    items = session.execute(
        text(
            """
            SELECT id, source_kind, source_id, deliveries FROM work_items
            WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND status = 'pending' AND updated_at <= :created
            ORDER BY id
            """
        ),
        {"ids": id_array(item_ids), "created": created_at},
    ).all()
    if not items:
        session.execute(
            text("DELETE FROM batches WHERE batch_id = CAST(:batch AS uuid)"), {"batch": batch_id}
        )
        return []
    died = deliveries > 0 and not resume and upto is not None
    suspects = {r[0] for r in items if r[0] <= upto} if died else set()
    if suspects:
        session.execute(
            text(
                "UPDATE work_items SET deliveries = deliveries + 1 "
                "WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))"
            ),
            {"ids": id_array(suspects)},
        )
    session.execute(
        text(
            f"""
            UPDATE batches SET deliveries = deliveries + 1, worker = :worker,
                lease_until = {_LEASE}, started_upto = :upto, n_items = :n + n_finished
            WHERE batch_id = CAST(:batch AS uuid)
            """
        ),
        {
            "batch": batch_id,
            "worker": worker,
            "lease": lease_seconds,
            "upto": None if by_chunk else items[-1][0],
            "n": len(items),
        },
    )
    return [StartedItem(i, k, s, d + (1 if i in suspects else 0)) for i, k, s, d in items]


def start_chunk(
    session: Session, *, batch_id: str, item_ids: Sequence[int], worker: str, lease_seconds: int
) -> set[int]:
    """Take up one chunk of a batch begun with `start_batch(by_chunk=True)`: the
    batch row records it (`started_upto`, the chunk's last id; chunks are taken
    up in id order) under `worker` with a fresh lease. One row written. Returns
    the chunk's ids, or none when the batch is no longer open (reclaimed: skip
    the chunk)."""
    if not item_ids:
        return set()
    found = session.execute(
        text(
            f"""
            UPDATE batches SET started_upto = GREATEST(COALESCE(started_upto, 0), :upto),
                worker = :worker, lease_until = {_LEASE}
            WHERE batch_id = CAST(:batch AS uuid)
            RETURNING 1
            """
        ),
        {"batch": batch_id, "upto": max(item_ids), "worker": worker, "lease": lease_seconds},
    ).first()
    return set(item_ids) if found else set()


def extend_lease(
    session: Session, *, batch_id: str, lease_seconds: int, worker: str | None = None
) -> int:
    """Heartbeat of a running batch (workers.heartbeat): renew its lease, only if
    `worker` (when given) is the one that started it last. Returns 1, or 0 when
    the batch is no longer this worker's (finished, or reclaimed while it was
    unreachable)."""
    result = session.execute(
        text(
            f"""
            UPDATE batches SET lease_until = {_LEASE}
            WHERE batch_id = CAST(:batch AS uuid)
              AND (CAST(:worker AS text) IS NULL OR worker IS NULL OR worker = :worker)
            """
        ),
        {"batch": batch_id, "lease": lease_seconds, "worker": worker},
    )
    return _rowcount(result)


_FINISH = text(
    """
    WITH live AS (
        SELECT created_at, worker FROM batches
        WHERE batch_id = CAST(:batch AS uuid) FOR UPDATE
    ), fin AS (
        UPDATE work_items w
        SET status = CASE WHEN w.id = ANY(CAST(:bad AS bigint[])) THEN 'failed' ELSE 'done' END,
            last_error = CASE WHEN w.id = ANY(CAST(:bad AS bigint[])) THEN
                (SELECT e.err FROM unnest(CAST(:bad AS bigint[]), CAST(:errs AS text[]))
                        AS e(id, err) WHERE e.id = w.id LIMIT 1) END,
            batch_id = CAST(:batch AS uuid), worker = live.worker,
            deliveries = w.deliveries + 1, lease_until = NULL, updated_at = now()
        FROM live
        WHERE w.id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
          AND w.status = 'pending' AND w.updated_at <= live.created_at
        RETURNING w.id, w.status
    ), counted AS (
        UPDATE batches SET n_finished = n_finished + (SELECT count(*) FROM fin)
        WHERE batch_id = CAST(:batch AS uuid) AND NOT :last AND EXISTS (SELECT 1 FROM live)
        RETURNING 1
    ), closed AS (
        DELETE FROM batches WHERE batch_id = CAST(:batch AS uuid) AND :last RETURNING 1
    )
    SELECT COALESCE(array_agg(id), '{}'), count(*) FILTER (WHERE status = 'done'),
           count(*) FILTER (WHERE status = 'failed')
    FROM fin
    """
)

# The form that replaces an earlier attempt's result (a failed item's kept raw
# output, then `fleet retry`): the rows as one JSON document, the model columns
# once per model (ledgerrows.result_rows).
_UPSERT = text(
    f"""
    INSERT INTO results ({RESULT_COLUMNS})
    SELECT r.work_item_id, r.label, r.confidence, r.scores, r.output,
           m.model_name, m.model_revision, m.model_tier, m.device, r.latency_ms
    FROM json_to_recordset(CAST(:rows AS json)) AS r(
        work_item_id bigint, label varchar, confidence float8, scores jsonb,
        output jsonb, latency_ms float8, m int)
    JOIN unnest(CAST(:names AS varchar[]), CAST(:revisions AS varchar[]),
                CAST(:tiers AS int[]), CAST(:devices AS varchar[]))
         WITH ORDINALITY AS m(model_name, model_revision, model_tier, device, k)
      ON m.k = r.m
    ON CONFLICT (work_item_id) DO UPDATE SET
        label = EXCLUDED.label, confidence = EXCLUDED.confidence,
        scores = EXCLUDED.scores, output = EXCLUDED.output,
        model_name = EXCLUDED.model_name, model_revision = EXCLUDED.model_revision,
        model_tier = EXCLUDED.model_tier, device = EXCLUDED.device,
        latency_ms = EXCLUDED.latency_ms, created_at = now()
    """
)


def finish_batch(
    session: Session, *, batch_id: str, outcomes: Sequence[Outcome], last: bool = False
) -> FinishCounts:
    """Write a batch's (or one chunk's) results and final states in the caller's
    transaction.

    Only items still the open batch's own change (pending, not reset since the
    claim), and results are written for exactly those: finishing twice
    leaves one result per item. Each finished item's row gets one heap-only
    update (status, last_error, batch_id, worker, a delivery counted,
    updated_at), in one statement that first locks the batch row (so the
    reconciler cannot close the batch halfway), counts the items finished on
    it (`n_finished`) and, for `last` (the message's last chunk), closes it.

    The results go in by `COPY ... FROM STDIN` (text format, built in one pass:
    ledgerrows.copy_text), under a savepoint: an item that still holds an
    earlier attempt's result makes the copy fail on the unique key, and the
    results are then upserted instead.

    Raises ValueError, before anything is written, when a result's scores or
    output hold NaN or infinity.
    """
    ids = {o.item_id for o in outcomes if o.result is not None}
    rows = copy_text(outcomes, ids)  # validates every result first
    bad = [o for o in outcomes if o.error is not None]
    finished, done, failed = session.execute(
        _FINISH,
        {
            "ids": id_array(o.item_id for o in outcomes),
            "bad": id_array(o.item_id for o in bad),
            "errs": [o.error for o in bad],
            "batch": batch_id,
            "last": last,
        },
    ).one()
    keep = ids.intersection(finished)
    if keep:
        _write_results(session, outcomes, keep, rows if keep == ids else None)
    return FinishCounts(done=done, failed=failed, skipped=len(outcomes) - done - failed)


def _write_results(
    session: Session, outcomes: Sequence[Outcome], keep: set[int], rows: str | None
) -> None:
    """The results of the items in `keep`: COPY, or the upsert if one holds a result."""
    raw = session.connection().connection.driver_connection
    assert raw is not None
    raw.execute("SAVEPOINT fleet_results")
    try:
        with raw.cursor() as cursor:
            with cursor.copy(f"COPY results ({RESULT_COLUMNS}) FROM STDIN") as copy:
                copy.write(rows if rows is not None else copy_text(outcomes, keep))
        raw.execute("RELEASE SAVEPOINT fleet_results")
    except UniqueViolation:
        raw.execute("ROLLBACK TO SAVEPOINT fleet_results")
        json_rows, (names, revisions, tiers, devices) = result_rows(
            o for o in outcomes if o.item_id in keep
        )
        session.execute(
            _UPSERT,
            {
                "rows": results_json(json_rows),
                "names": names,
                "revisions": revisions,
                "tiers": tiers,
                "devices": devices,
            },
        )


def _close(session: Session, batch_id: str) -> tuple[list[int], object] | None:
    """Delete an open batch's row: (its item ids, its created_at), or None if none."""
    row = session.execute(
        text(
            "DELETE FROM batches WHERE batch_id = CAST(:batch AS uuid) "
            "RETURNING item_ids, created_at"
        ),
        {"batch": batch_id},
    ).one_or_none()
    return None if row is None else (list(row[0]), row[1])


def _queue_rest(session: Session, ids: Sequence[int], created_at: object) -> None:
    """Queue again the items of a closed batch (created at `created_at`) that are
    still its own: those a split or a dead mark did not take."""
    if ids:
        session.execute(
            text(
                f"""
                WITH rest AS (
                    SELECT id, task, size_hint FROM work_items
                    WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
                      AND status = 'pending' AND updated_at <= :created
                ) {bucket_sql("rest")}
                """
            ),
            {"ids": id_array(ids), "created": created_at},
        )


def split_batch(
    session: Session,
    *,
    batch_id: str,
    parts: Sequence[Sequence[int]],
    lease_seconds: int,
    reset_deliveries: bool,
) -> list[ClaimedBatch]:
    """Re-batch a suspected poison batch into parts with fresh batch ids
    (see `workers.policy.poison_plan` for when and how); the old batch closes.

    Attempts restart at zero, so innocent neighbours of a poison item do not use
    up their attempts while it is being isolated; deliveries (deaths counted)
    stay, unless `reset_deliveries`. Items no longer the batch's own are left
    out; the batch's own items in no part are queued again. Returns the parts written (none: the batch was no longer open)."""
    closed = _close(session, batch_id)
    if closed is None:
        return []
    ids = [i for part in parts for i in part]
    wanted = set(ids)
    _queue_rest(session, [i for i in closed[0] if i not in wanted], closed[1])
    task, mine = None, set()
    for item_id, t in session.execute(
        text(
            """
            UPDATE work_items
            SET attempts = 0, deliveries = CASE WHEN :reset THEN 0 ELSE deliveries END
            WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND status = 'pending' AND updated_at <= :created
            RETURNING id, task
            """
        ),
        {"ids": id_array(ids), "reset": reset_deliveries, "created": closed[1]},
    ):
        mine.add(item_id)
        task = t
    out = [
        ClaimedBatch(str(uuid.uuid4()), got)
        for got in (tuple(sorted(i for i in part if i in mine)) for part in parts)
        if got
    ]
    if out and task is not None:
        insert_batches(session, task=task, batches=out, lease_seconds=lease_seconds)
    return out


def mark_dead(session: Session, *, batch_id: str, item_ids: Sequence[int], reason: str) -> int:
    """Mark the batch's own items among `item_ids` dead with `reason` and close the
    batch (its other items, if any, are queued again). Returns the items marked."""
    closed = _close(session, batch_id)
    if closed is None:
        return 0
    wanted = set(item_ids)
    _queue_rest(session, [i for i in closed[0] if i not in wanted], closed[1])
    result = session.execute(
        text(
            """
            UPDATE work_items
            SET status = 'dead', lease_until = NULL, last_error = :reason, updated_at = now()
            WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
              AND status = 'pending' AND updated_at <= :created
            """
        ),
        {"ids": id_array(item_ids), "reason": reason, "created": closed[1]},
    )
    return _rowcount(result)
