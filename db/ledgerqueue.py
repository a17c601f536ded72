"""The ledger's queue: how items become claimable and how claims take them.

A pending item waits in `work_queue`, in buckets of at most BUCKET ids in size
order, or in an open `batches` row once claimed. Everything that makes an item
pending puts it in a bucket in the same transaction (discover, add_items,
retry, reconcile, db.history's resets, db.ladders' promotion). A claim locks
whole buckets with `FOR UPDATE SKIP LOCKED`, deletes them and writes one
`batches` row per batch: it writes nothing per item, and two producers never
take the same bucket. Buckets are cut in (size_hint, id) order, so a batch of
adjacent buckets holds similar lengths.

An item is in at most one place: a bucket, or the open batch whose
`created_at` (clock_timestamp() at the claim) is not older than the item's
`updated_at`. A reset bumps `updated_at` past every open batch that holds the
item and queues it again, unless a bucket already holds it (`hold_queued`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.ledgerrows import ClaimedBatch, _rowcount, id_array
from db.schema import Status

# Ids per bucket: 224 bigints stay under Postgres's TOAST threshold, so a bucket
# is one heap tuple, read and deleted in place.
BUCKET = 224


def bucket_sql(source: str) -> str:
    """`INSERT INTO work_queue` of the rows (id, task, size_hint) of `source` (a
    table, CTE or subquery), cut into buckets of BUCKET ids in size order."""
    return f"""
        INSERT INTO work_queue (task, min_size, item_ids)
        SELECT task, min(size_hint), array_agg(id ORDER BY size_hint, id)
        FROM (SELECT task, id, size_hint,
                     (row_number() OVER (PARTITION BY task ORDER BY size_hint, id) - 1)
                     / {BUCKET} AS k
              FROM {source}) AS cut
        GROUP BY task, k
    """


def enqueue(session: Session, item_ids: Sequence[int]) -> int:
    """Put these items, those of them that are pending, in buckets. The caller
    makes sure no bucket holds them already (`hold_queued`). Returns the items queued."""
    if not item_ids:
        return 0
    return int(
        session.execute(
            text(
                f"""
                WITH todo AS (
                    SELECT id, task, size_hint FROM work_items
                    WHERE id = ANY(ARRAY(SELECT unnest(CAST(:ids AS bigint[]))))
                      AND status = 'pending'
                ), q AS ({bucket_sql("todo")} RETURNING 1)
                SELECT count(*) FROM todo
                """
            ),
            {"ids": id_array(item_ids)},
        ).scalar_one()
    )


def hold_queued(session: Session, item_ids: Sequence[int]) -> set[int]:
    """Lock the buckets that hold any of these items and return the ids among
    them that a bucket holds. A claim taking such a bucket right now is waited
    for (its batch is then visible, and older than anything this transaction
    writes next); a later claim skips the locked buckets until commit."""
    if not item_ids:
        return set()
    rows = session.execute(
        text(
            """
            SELECT q.item_ids FROM work_queue q
            WHERE EXISTS (SELECT 1 FROM unnest(q.item_ids) u(id)
                          WHERE u.id = ANY(CAST(:ids AS bigint[])))
            FOR UPDATE
            """
        ),
        {"ids": id_array(item_ids)},
    ).scalars()
    wanted = set(item_ids)
    return {i for ids in rows for i in ids if i in wanted}


def unqueue(session: Session, item_ids: Sequence[int]) -> int:
    """Take these items out of the buckets that hold them (an item that stops
    being pending while it waits: gone from its source), so no claim counts
    them. A bucket left empty goes. Returns the items taken out."""
    held = hold_queued(session, item_ids)
    if held:
        session.execute(
            text(
                """
                WITH cut AS (
                    UPDATE work_queue q
                    SET item_ids = ARRAY(SELECT u.id FROM unnest(q.item_ids) WITH ORDINALITY
                                         AS u(id, k)
                                         WHERE u.id <> ALL(CAST(:ids AS bigint[])) ORDER BY u.k)
                    WHERE q.item_ids && CAST(:ids AS bigint[])
                    RETURNING q.bucket, q.item_ids
                )
                DELETE FROM work_queue WHERE bucket IN
                    (SELECT bucket FROM cut WHERE cardinality(item_ids) = 0)
                """
            ),
            {"ids": id_array(held)},
        )
    return len(held)


def discover(session: Session, *, task: str, source_kind: str, limit: int | None = None) -> int:
    """Insert a pending work item for every source of this kind that has none for
    the task, and queue it. One statement; the unique key makes concurrent
    discovery safe."""
    table, size = {
        "conversation": ("conversations", "octet_length(s.messages::text)"),
        "audio": ("audio_files", "COALESCE(round(s.duration_s * 100), 0)"),
    }[source_kind]
    limit_sql = "LIMIT :limit" if limit is not None else ""
    return int(
        session.execute(
            text(
                f"""
                WITH new AS (
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
                    RETURNING id, task, size_hint
                ), q AS ({bucket_sql("new")} RETURNING 1)
                SELECT count(*) FROM new
                """
            ),
            {"kind": source_kind, "task": task, "limit": limit},
        ).scalar_one()
    )


def claimable(session: Session, *, task: str, source_kind: str) -> tuple[int, int]:
    """(queued items, sources with no item yet) for a task: what an enqueue would take."""
    table = {"conversation": "conversations", "audio": "audio_files"}[source_kind]
    pending = session.execute(
        text("SELECT COALESCE(sum(cardinality(item_ids)), 0) FROM work_queue WHERE task = :t"),
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
    """Create and queue pending items for given sources (e.g. the intent task on a
    fresh transcript)."""
    if not source_ids:
        return 0
    return int(
        session.execute(
            text(
                f"""
                WITH new AS (
                    INSERT INTO work_items (source_kind, source_id, task, status)
                    SELECT CAST(:kind AS varchar), sid, CAST(:task AS varchar), 'pending'
                    FROM unnest(CAST(:ids AS bigint[])) AS sid
                    ON CONFLICT ON CONSTRAINT uq_work_items_source_task DO NOTHING
                    RETURNING id, task, size_hint
                ), q AS ({bucket_sql("new")} RETURNING 1)
                SELECT count(*) FROM new
                """
            ),
            {"kind": source_kind, "task": task, "ids": id_array(source_ids)},
        ).scalar_one()
    )


_TAKE = text(
    """
    WITH locked AS (
        SELECT ctid FROM work_queue WHERE task = :task
        ORDER BY min_size, bucket LIMIT :n
        FOR UPDATE SKIP LOCKED
    ), taken AS (
        DELETE FROM work_queue WHERE ctid = ANY(ARRAY(SELECT ctid FROM locked))
        RETURNING min_size, bucket, item_ids
    )
    SELECT item_ids, min_size FROM taken ORDER BY min_size, bucket
    """
)


def claim_batches(
    session: Session, *, task: str, limit: int, batch_size: int, lease_seconds: int
) -> list[ClaimedBatch]:
    """Claim up to `limit` queued items, cut into batches of `batch_size`, each
    leased for `lease_seconds`.

    Takes whole buckets in size order (`FOR UPDATE SKIP LOCKED`: any number of
    producers claim at once and never take the same bucket), puts the part of
    the last bucket past `limit` back as a bucket of its own, and writes one
    `batches` row per batch (one pipelined executemany). Nothing is written per
    item: an item's row stays pending until its batch finishes it.
    """
    if limit <= 0:
        return []
    got: list[int] = []
    back: list[dict[str, object]] = []
    while len(got) < limit:
        want = limit - len(got)
        rows = session.execute(_TAKE, {"task": task, "n": -(-want // BUCKET)}).all()
        if not rows:
            break
        for ids, min_size in rows:
            room = limit - len(got)
            if len(ids) > room:
                back.append({"task": task, "min_size": min_size, "ids": id_array(ids[room:])})
                ids = ids[:room]
            got.extend(ids)
    if back:
        session.execute(
            text(
                "INSERT INTO work_queue (task, min_size, item_ids) "
                "VALUES (:task, :min_size, CAST(:ids AS bigint[]))"
            ),
            back,
        )
    batches = [
        ClaimedBatch(str(uuid.uuid4()), tuple(sorted(got[i : i + batch_size])))
        for i in range(0, len(got), batch_size)
    ]
    if batches:
        insert_batches(session, task=task, batches=batches, lease_seconds=lease_seconds)
    return batches


def insert_batches(
    session: Session, *, task: str, batches: Sequence[ClaimedBatch], lease_seconds: int
) -> None:
    """One open `batches` row per batch (created now, by clock_timestamp(): later
    than anything committed before this call)."""
    session.execute(
        text(
            """
            INSERT INTO batches (batch_id, task, item_ids, n_items, lease_until, created_at)
            VALUES (CAST(:batch AS uuid), :task, CAST(:ids AS bigint[]), :n,
                    now() + make_interval(secs => :lease), clock_timestamp())
            """
        ),
        [
            {
                "batch": b.batch_id,
                "task": task,
                "ids": id_array(b.item_ids),
                "n": len(b.item_ids),
                "lease": lease_seconds,
            }
            for b in batches
        ],
    )


def reconcile(session: Session, *, max_attempts: int, task: str | None = None) -> dict[str, int]:
    """Close the batches whose lease expired and queue their unfinished items
    again; an item past the attempt limit is marked dead.

    This is what makes a lost Redis message or a killed worker harmless: the
    ledger, not the broker, knows what is unfinished. Only the items of chunks
    a worker had taken up (`started_upto`) count a death and an attempt against
    them: an item whose batch was never started, or whose chunk was not reached,
    was not the item's fault. A batch being finished right now is skipped
    (SKIP LOCKED) and looked at on the next pass.
    """
    task_sql = "AND task = :task" if task else ""
    dead_msg = (
        "'started by a worker ' || (w.attempts + 1) || ' times and never finished '"
        "'(the worker was lost each time, or the batch outlasted '"
        "'FLEET_LEASE_SECONDS); `fleet retry --status dead` puts it back'"
    )
    returned, dead = session.execute(
        text(
            f"""
            WITH expired AS (
                DELETE FROM batches WHERE batch_id IN (
                    SELECT batch_id FROM batches WHERE lease_until < now() {task_sql}
                    FOR UPDATE SKIP LOCKED)
                RETURNING item_ids, created_at, deliveries, started_upto
            ), x AS (
                SELECT u.id, e.created_at,
                       (e.deliveries > 0 AND u.id <= e.started_upto) IS TRUE AS taken
                FROM expired e, unnest(e.item_ids) AS u(id)
            ), upd AS (
                UPDATE work_items w
                SET attempts = w.attempts + CASE WHEN x.taken THEN 1 ELSE 0 END,
                    deliveries = w.deliveries + CASE WHEN x.taken THEN 1 ELSE 0 END,
                    status = CASE WHEN x.taken AND w.attempts + 1 >= :max THEN 'dead'
                                  ELSE 'pending' END,
                    last_error = CASE WHEN x.taken AND w.attempts + 1 >= :max THEN {dead_msg}
                                      ELSE w.last_error END,
                    updated_at = now()
                FROM x
                WHERE w.id = x.id AND w.status = 'pending' AND w.updated_at <= x.created_at
                RETURNING w.id, w.task, w.size_hint, w.status
            ), q AS ({bucket_sql("(SELECT * FROM upd WHERE status = 'pending') AS back")}
                     RETURNING 1)
            SELECT count(*) FILTER (WHERE status = 'pending'),
                   count(*) FILTER (WHERE status = 'dead')
            FROM upd
            """
        ),
        {"max": max_attempts, "task": task},
    ).one()
    return {"returned": int(returned), "dead": int(dead)}


def retry(session: Session, *, statuses: Sequence[str], task: str | None = None) -> int:
    """Put failed, dead or parked items back to pending (queued) with fresh counts.

    Raises ValueError for another status."""
    allowed = {Status.FAILED.value, Status.DEAD.value, Status.PARKED.value}
    if not set(statuses) <= allowed:
        raise ValueError(f"retry takes statuses from {sorted(allowed)}, got {list(statuses)}")
    task_sql = "AND task = :task" if task else ""
    return int(
        session.execute(
            text(
                f"""
                WITH upd AS (
                    UPDATE work_items
                    SET status = 'pending', attempts = 0, deliveries = 0, batch_id = NULL,
                        lease_until = NULL, updated_at = now()
                    WHERE status = ANY(CAST(:statuses AS text[])) {task_sql}
                    RETURNING id, task, size_hint
                ), q AS ({bucket_sql("upd")} RETURNING 1)
                SELECT count(*) FROM upd
                """
            ),
            {"statuses": list(statuses), "task": task},
        ).scalar_one()
    )


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
