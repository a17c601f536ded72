"""fleet_latest_results shows a cascade's final label, the tier that decided and whether it escalated

A task with `escalate_to` marks each result it escalates (`output.escalated_to`,
workers.cascade) and creates an item on the stronger task for the same source
row. The view now resolves that pair into one row per (task, source row):

- label, confidence, model, model_revision: the stronger task's answer once it
  is done, else the task's own;
- decided_by: the task whose model gave `label`;
- escalated: whether the result was sent to the stronger task;
- first_label: the task's own label (the cheap tier's answer);
- escalation_note: NULL unless escalated and the stronger task has not (yet)
  answered: waiting for it, or it failed (with its reason) and the first label
  stands.

Every earlier column is kept (0009's, in the same branches: keys as plain
columns, `stale`, `confirmed_label`); scores and output stay the task's own
result's. A previous result served stale (its item being classified again)
is the task's own: decided_by is the task, escalation_note NULL.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CURRENT = """
SELECT s.external_id,
       {source} AS source,
       w.source_kind,
       w.task,
       CASE WHEN sr.work_item_id IS NULL THEN r.label ELSE sr.label END AS label,
       CASE WHEN sr.work_item_id IS NULL THEN r.confidence ELSE sr.confidence END AS confidence,
       r.scores,
       r.output,
       CASE WHEN sr.work_item_id IS NULL THEN r.model_name ELSE sr.model_name END AS model,
       CASE WHEN sr.work_item_id IS NULL THEN r.model_revision ELSE sr.model_revision END
           AS model_revision,
       GREATEST(r.created_at, sr.created_at) AS updated_at,
       w.status <> 'done' OR EXISTS (
           SELECT 1 FROM sync_problems p
           WHERE p.refused AND p.source = s.source AND p.external_id = s.external_id
       ) AS stale,
       cl.label AS confirmed_label,
       CASE WHEN sr.work_item_id IS NULL THEN w.task ELSE sw.task END AS decided_by,
       (r.output ->> 'escalated_to') IS NOT NULL AS escalated,
       r.label AS first_label,
       CASE
           WHEN (r.output ->> 'escalated_to') IS NULL OR sr.work_item_id IS NOT NULL THEN NULL
           WHEN sw.id IS NULL THEN 'escalated to ' || (r.output ->> 'escalated_to')
               || ', which has no item for this row; the first label stands'
           WHEN sw.status IN ('failed', 'dead', 'gone', 'parked') THEN 'the stronger tier '
               || sw.task || ' ' || sw.status || ' ('
               || COALESCE(sw.last_error, 'no reason recorded') || '); the first label stands'
           ELSE 'waiting for the stronger tier ' || sw.task || ' (' || sw.status
               || '); the first label stands until it answers'
       END AS escalation_note
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN results r ON r.work_item_id = w.id
LEFT JOIN confirmed_labels cl
       ON cl.source_kind = w.source_kind AND cl.source_id = w.source_id AND cl.task = w.task
LEFT JOIN work_items sw ON sw.task = (r.output ->> 'escalated_to')
    AND sw.source_kind = w.source_kind AND sw.source_id = w.source_id
LEFT JOIN results sr ON sr.work_item_id = sw.id AND sw.status = 'done' AND sr.label IS NOT NULL
WHERE w.status IN ('done', 'pending', 'queued', 'running') AND s.source IS {null}
"""
_PREVIOUS = """
SELECT s.external_id,
       {source},
       w.source_kind,
       w.task,
       h.label,
       h.confidence,
       h.scores,
       h.output,
       h.model_name,
       h.model_revision,
       h.classified_at,
       true,
       cl.label,
       w.task,
       (h.output ->> 'escalated_to') IS NOT NULL,
       h.label,
       CAST(NULL AS text)
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN LATERAL (
    SELECT * FROM result_history h
    WHERE h.work_item_id = w.id AND h.reason IN ('content_changed', 'rerun')
    ORDER BY h.id DESC LIMIT 1
) h ON true
LEFT JOIN confirmed_labels cl
       ON cl.source_kind = w.source_kind AND cl.source_id = w.source_id AND cl.task = w.task
WHERE w.status IN ('pending', 'queued', 'running', 'failed', 'dead', 'parked')
  AND s.source IS {null}
  AND NOT EXISTS (SELECT 1 FROM results r WHERE r.work_item_id = w.id)
"""
CASCADE_VIEW = "CREATE VIEW fleet_latest_results AS" + "UNION ALL".join(
    branch.format(source=source, table=table, kind=kind, null=null)
    for branch in (_CURRENT, _PREVIOUS)
    for table, kind in (("conversations", "conversation"), ("audio_files", "audio"))
    for source, null in (("s.source", "NOT NULL"), ("CAST('ingest' AS varchar(64))", "NULL"))
)


def _load_0009() -> Any:
    """Migration 0009's module, whose view a downgrade restores."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("0009_review_loop.py")
    spec = importlib.util.spec_from_file_location("fleet_migration_0009", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(CASCADE_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(_load_0009().NEW_VIEW)
