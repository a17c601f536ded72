"""Replacing results: the old one goes to result_history, the item back to pending.

Three things make a stored result stale, and each ends here:

    content_changed  the source row was edited or grew (db.sync)   -> pending
    rerun            the result came from another model revision     -> pending
                     (`fleet rerun`, FLEET_RERUN_STALE)
    gone             the source row disappeared (db.sync)           -> gone

The archive and the state change run in the caller's transaction, so a result
is never lost and never shown twice: it is either current (results) or history.
A worker still running an item that is reset here finds it no longer its
batch's own (its updated_at moved past the batch's created_at) and its late
finish changes nothing; the item is queued again (db.ledgerqueue), unless a
bucket holds it already.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.ledger import _rowcount, enqueue, hold_queued, id_array, unqueue

TABLES = {"conversation": "conversations", "audio": "audio_files"}
SIZES = {
    "conversation": "octet_length(s.messages::text)",
    "audio": "COALESCE(round(s.duration_s * 100), 0)",
}


def archive_results(session: Session, *, item_ids: Sequence[int], reason: str) -> int:
    """Move the results of these work items into result_history (with their model,
    revision, tier and time, and the source row's source and external_id: an
    external_id is unique per source only; NULL source: a `fleet ingest` row).
    Runs before the source row may be deleted. Returns how many results moved."""
    if not item_ids:
        return 0
    result = session.execute(
        text(
            """
            WITH old AS (
                DELETE FROM results r USING work_items w
                WHERE r.work_item_id = w.id AND w.id = ANY(CAST(:ids AS bigint[]))
                RETURNING r.*, w.task, w.source_kind, w.source_id
            )
            INSERT INTO result_history (work_item_id, task, source_kind, source_id, source,
                                        external_id, label, confidence, scores, output,
                                        model_name, model_revision, model_tier, classified_at,
                                        reason)
            SELECT old.work_item_id, old.task, old.source_kind, old.source_id,
                   COALESCE(c.source, a.source), COALESCE(c.external_id, a.external_id),
                   old.label, old.confidence,
                   old.scores, old.output, old.model_name, old.model_revision, old.model_tier,
                   old.created_at, CAST(:reason AS varchar)
            FROM old
            LEFT JOIN conversations c ON old.source_kind = 'conversation' AND c.id = old.source_id
            LEFT JOIN audio_files a ON old.source_kind = 'audio' AND a.id = old.source_id
            """
        ),
        {"ids": id_array(item_ids), "reason": reason},
    )
    return _rowcount(result)


def items_of_sources(session: Session, *, source_kind: str, source_ids: Sequence[int]) -> list[int]:
    """Every work item (any task) of these source rows."""
    if not source_ids:
        return []
    return list(
        session.execute(
            text(
                "SELECT id FROM work_items WHERE source_kind = :kind "
                "AND source_id = ANY(CAST(:ids AS bigint[]))"
            ),
            {"kind": source_kind, "ids": id_array(source_ids)},
        ).scalars()
    )


def reset_items(session: Session, *, item_ids: Sequence[int], reason: str) -> int:
    """Archive the items' results and put them back to pending with fresh counts
    and their size recomputed from the (new) source content."""
    if not item_ids:
        return 0
    archive_results(session, item_ids=item_ids, reason=reason)
    held = hold_queued(session, item_ids)  # before updated_at moves: see db.ledgerqueue
    total = 0
    for kind, table in TABLES.items():
        total += _rowcount(
            session.execute(
                text(
                    f"""
                    UPDATE work_items w
                    SET status = 'pending', attempts = 0, deliveries = 0, batch_id = NULL,
                        lease_until = NULL, worker = NULL, last_error = NULL,
                        size_hint = {SIZES[kind]}, updated_at = clock_timestamp()
                    FROM {table} s
                    WHERE w.id = ANY(CAST(:ids AS bigint[]))
                      AND w.source_kind = :kind AND s.id = w.source_id
                    """
                ),
                {"ids": id_array(item_ids), "kind": kind},
            )
        )
    enqueue(session, [i for i in item_ids if i not in held])
    return total


def mark_gone(session: Session, *, item_ids: Sequence[int], why: str) -> int:
    """Archive the items' results and mark them gone: not failed, never claimed again."""
    if not item_ids:
        return 0
    archive_results(session, item_ids=item_ids, reason="gone")
    unqueue(session, item_ids)
    return _rowcount(
        session.execute(
            text(
                """
                UPDATE work_items
                SET status = 'gone', batch_id = NULL, lease_until = NULL, last_error = :why,
                    updated_at = now()
                WHERE id = ANY(CAST(:ids AS bigint[]))
                """
            ),
            {"ids": id_array(item_ids), "why": why},
        )
    )


def stale_items(
    session: Session,
    *,
    task: str,
    current: Sequence[str] = (),
    since: str | None = None,
) -> list[int]:
    """Done or failed items of a task whose result came from another model version.

    A result is current when its model_revision or its model_name is one of
    `current` (revisions such as a snapshot commit or "sha256:<hex>", or tier
    names); every other result is stale. An empty `current` makes every result
    stale. `since` (an ISO date or timestamp) keeps only results made at or after it.
    """
    clauses = ["w.task = :task", "w.status IN ('done', 'failed')"]
    params: dict[str, object] = {"task": task}
    if current:
        clauses.append(
            "NOT (COALESCE(r.model_revision, '') = ANY(CAST(:current AS text[])) "
            "OR r.model_name = ANY(CAST(:current AS text[])))"
        )
        params["current"] = list(current)
    if since is not None:
        clauses.append("r.created_at >= CAST(:since AS timestamptz)")
        params["since"] = since
    return list(
        session.execute(
            text(
                "SELECT w.id FROM work_items w JOIN results r ON r.work_item_id = w.id "
                f"WHERE {' AND '.join(clauses)} ORDER BY w.id"
            ),
            params,
        ).scalars()
    )


def restore_gone(session: Session, *, item_ids: Sequence[int]) -> int:
    """Gone items whose source row came back with the same content: the result each
    had when it went (its latest result_history row of reason 'gone') is current
    again and the item done; an item that had none goes back to pending. The
    restored result keeps its model, revision and time; device reads 'restored'.
    Returns how many results came back."""
    if not item_ids:
        return 0
    held = hold_queued(session, item_ids)
    restored = _rowcount(
        session.execute(
            text(
                """
                WITH last AS (
                    SELECT DISTINCT ON (h.work_item_id) h.id
                    FROM result_history h JOIN work_items w ON w.id = h.work_item_id
                    WHERE h.work_item_id = ANY(CAST(:ids AS bigint[])) AND h.reason = 'gone'
                      AND w.status = 'gone'
                    ORDER BY h.work_item_id, h.id DESC
                ), moved AS (
                    DELETE FROM result_history h USING last WHERE h.id = last.id RETURNING h.*
                )
                INSERT INTO results (work_item_id, label, confidence, scores, output, model_name,
                                     model_tier, device, latency_ms, created_at, model_revision)
                SELECT work_item_id, label, confidence, scores, output, model_name, model_tier,
                       'restored', 0, classified_at, model_revision
                FROM moved
                ON CONFLICT (work_item_id) DO NOTHING
                """
            ),
            {"ids": id_array(item_ids)},
        )
    )
    session.execute(
        text(
            """
            UPDATE work_items w
            SET status = CASE WHEN EXISTS (SELECT 1 FROM results r WHERE r.work_item_id = w.id)
                              THEN 'done' ELSE 'pending' END,
                last_error = NULL, batch_id = NULL, lease_until = NULL,
                updated_at = clock_timestamp()
            WHERE w.id = ANY(CAST(:ids AS bigint[])) AND w.status = 'gone'
            """
        ),
        {"ids": id_array(item_ids)},
    )
    enqueue(session, [i for i in item_ids if i not in held])
    return restored
