"""Ladders set by `fleet promote`, and putting a task back to the previous model.

The newest `ladder_overrides` row of a task that was not rolled back replaces
the task config's ladder wherever a worker resolves it
(`workers.state.start_runtime`). Promotion copies each current result into
result_history (reason `promote:<override id>`) but leaves it in `results`, so
the old label is served until the new model's result replaces it; rollback
restores exactly those copies in one transaction.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from config.taskconfig import TaskSpec, with_ladders
from db.ledger import _rowcount, bucket_sql


def current_override(session: Session, *, task: str) -> tuple[int, list[dict[str, Any]]] | None:
    """(override id, ladder tables) in force for the task, or None (the config's ladder)."""
    row = session.execute(
        text(
            "SELECT id, ladder FROM ladder_overrides WHERE task = :task "
            "AND rolled_back_at IS NULL ORDER BY id DESC LIMIT 1"
        ),
        {"task": task},
    ).first()
    return None if row is None else (int(row[0]), list(row[1]))


def all_overrides(session: Session) -> dict[str, list[dict[str, Any]]]:
    """{task: ladder tables} for every task with an override in force."""
    rows = session.execute(
        text(
            "SELECT DISTINCT ON (task) task, ladder FROM ladder_overrides "
            "WHERE rolled_back_at IS NULL ORDER BY task, id DESC"
        )
    )
    return {str(r[0]): list(r[1]) for r in rows}


def effective_tasks(session: Session, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
    """`tasks` with the promoted ladders in force: what workers serve and what
    `fleet rerun` counts as current."""
    return with_ladders(tasks, all_overrides(session))


def promote(
    session: Session, *, task: str, ladder: list[dict[str, Any]], gates: dict[str, Any]
) -> tuple[int, int]:
    """Record the ladder, keep a copy of every current result of the task in
    result_history, and put its done and failed items back to pending with their
    results still served. Returns (override id, items put back)."""
    oid = int(
        session.execute(
            text(
                "INSERT INTO ladder_overrides (task, ladder, gates) "
                "VALUES (:task, CAST(:ladder AS jsonb), CAST(:gates AS jsonb)) RETURNING id"
            ),
            {"task": task, "ladder": json.dumps(ladder), "gates": json.dumps(gates)},
        ).scalar_one()
    )
    session.execute(
        text(
            """
            INSERT INTO result_history (work_item_id, task, source_kind, source_id, source,
                                        external_id, label, confidence, scores, output,
                                        model_name, model_revision, model_tier, classified_at,
                                        reason)
            SELECT w.id, w.task, w.source_kind, w.source_id, COALESCE(c.source, a.source),
                   COALESCE(c.external_id, a.external_id), r.label, r.confidence, r.scores,
                   r.output, r.model_name, r.model_revision, r.model_tier, r.created_at, :reason
            FROM work_items w JOIN results r ON r.work_item_id = w.id
            LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
            LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
            WHERE w.task = :task
            """
        ),
        {"task": task, "reason": f"promote:{oid}"},
    )
    moved = int(
        session.execute(
            text(
                f"""
                WITH upd AS (
                    UPDATE work_items SET status = 'pending', attempts = 0, deliveries = 0,
                        batch_id = NULL, lease_until = NULL, worker = NULL, last_error = NULL,
                        updated_at = now()
                    WHERE task = :task AND status IN ('done', 'failed')
                    RETURNING id, task, size_hint
                ), q AS ({bucket_sql("upd")} RETURNING 1)
                SELECT count(*) FROM upd
                """
            ),
            {"task": task},
        ).scalar_one()
    )
    return oid, moved


def rollback(session: Session, *, task: str) -> tuple[int, int] | None:
    """Undo the task's newest promotion in the caller's one transaction: every result
    copied at that promotion goes back into `results`, updated in place (the result
    there now, from either model, goes to result_history as `rollback:<id>`), those items are done
    again, and the override is marked rolled back. No model runs. Returns
    (override id, results restored), or None when no promotion is in force."""
    found = current_override(session, task=task)
    if found is None:
        return None
    oid = found[0]
    reason = f"promote:{oid}"
    session.execute(
        text(
            """
            CREATE TEMPORARY TABLE restore ON COMMIT DROP AS
            SELECT DISTINCT ON (h.work_item_id) h.* FROM result_history h
            JOIN work_items w ON w.id = h.work_item_id
            WHERE h.reason = :reason ORDER BY h.work_item_id, h.id DESC
            """
        ),
        {"reason": reason},
    )
    # Temporary tables are never analyzed by autovacuum: without this the planner
    # guesses their size and may join a million rows by nested loop.
    session.execute(text("ANALYZE restore"))
    session.execute(
        text(
            """
            INSERT INTO result_history (work_item_id, task, source_kind, source_id, source,
                                        external_id, label, confidence, scores, output,
                                        model_name, model_revision, model_tier, classified_at,
                                        reason)
            SELECT r.work_item_id, x.task, x.source_kind, x.source_id, x.source, x.external_id,
                   r.label, r.confidence, r.scores, r.output, r.model_name, r.model_revision,
                   r.model_tier, r.created_at, :reason
            FROM results r JOIN restore x ON x.work_item_id = r.work_item_id
            """
        ),
        {"reason": f"rollback:{oid}"},
    )
    # One UPDATE in place (not DELETE + INSERT): each row is written once.
    restored = _rowcount(
        session.execute(
            text(
                """
                UPDATE results r SET label = x.label, confidence = x.confidence,
                    scores = x.scores, output = x.output, model_name = x.model_name,
                    model_revision = x.model_revision, model_tier = x.model_tier,
                    device = 'restored', latency_ms = 0, created_at = x.classified_at
                FROM restore x WHERE r.work_item_id = x.work_item_id
                """
            )
        )
    )
    restored += _rowcount(
        session.execute(
            text(
                """
                INSERT INTO results (work_item_id, label, confidence, scores, output, model_name,
                                     model_revision, model_tier, device, latency_ms, created_at)
                SELECT work_item_id, label, confidence, scores, output, model_name,
                       model_revision, model_tier, 'restored', 0, classified_at
                FROM restore x
                WHERE NOT EXISTS (SELECT 1 FROM results r WHERE r.work_item_id = x.work_item_id)
                """
            )
        )
    )
    # Items the new model already finished are done: only the others are written.
    session.execute(
        text(
            """
            UPDATE work_items w SET status = 'done', batch_id = NULL, lease_until = NULL,
                worker = NULL, last_error = NULL, updated_at = now()
            FROM restore x
            WHERE w.id = x.work_item_id AND w.status <> 'done'
            """
        )
    )
    session.execute(
        text("UPDATE ladder_overrides SET rolled_back_at = now() WHERE id = :id"), {"id": oid}
    )
    return oid, restored
