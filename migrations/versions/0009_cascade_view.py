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

Every earlier column is kept (scores and output stay the task's own result's).

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CASCADE_VIEW = """
CREATE VIEW fleet_latest_results AS
SELECT COALESCE(c.external_id, a.external_id) AS external_id,
       COALESCE(c.source, a.source, 'ingest') AS source,
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
       CASE WHEN sr.work_item_id IS NULL THEN w.task ELSE sw.task END AS decided_by,
       (r.output ->> 'escalated_to') IS NOT NULL AS escalated,
       r.label AS first_label,
       CASE
           WHEN (r.output ->> 'escalated_to') IS NULL OR sr.work_item_id IS NOT NULL THEN NULL
           WHEN sw.id IS NULL THEN 'escalated to ' || (r.output ->> 'escalated_to')
               || ', which has no item for this row; the first label stands'
           WHEN sw.status IN ('failed', 'dead', 'gone') THEN 'the stronger tier ' || sw.task
               || ' ' || sw.status || ' (' || COALESCE(sw.last_error, 'no reason recorded')
               || '); the first label stands'
           ELSE 'waiting for the stronger tier ' || sw.task || ' (' || sw.status
               || '); the first label stands until it answers'
       END AS escalation_note
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
LEFT JOIN work_items sw ON sw.task = (r.output ->> 'escalated_to')
    AND sw.source_kind = w.source_kind AND sw.source_id = w.source_id
LEFT JOIN results sr ON sr.work_item_id = sw.id AND sw.status = 'done' AND sr.label IS NOT NULL
WHERE w.status = 'done'
"""

PREVIOUS_VIEW = """
CREATE VIEW fleet_latest_results AS
SELECT COALESCE(c.external_id, a.external_id) AS external_id,
       COALESCE(c.source, a.source, 'ingest') AS source,
       w.source_kind,
       w.task,
       r.label,
       r.confidence,
       r.scores,
       r.output,
       r.model_name AS model,
       r.model_revision,
       r.created_at AS updated_at
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
WHERE w.status = 'done'
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(CASCADE_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(PREVIOUS_VIEW)
