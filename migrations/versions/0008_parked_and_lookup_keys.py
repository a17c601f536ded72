"""parked work items; fleet_latest_results keys an index serves

- work_items.status may be 'parked': a failed or dead item acknowledged as one
  that will never succeed (`fleet park`); downgrade makes them failed again.
- fleet_latest_results, recreated whole with 0007's columns: its keys are
  plain columns. The 0003 view filtered on COALESCE(c.external_id,
  a.external_id) and COALESCE(c.source, a.source, 'ingest'), which no index
  serves, so a lookup by (source, external_id, task) scanned every done item of
  the task (through postgres_fdw, every join pulled the whole task). Now one
  branch per source table and per sourced/ingested rows (UNION ALL): external_id
  and source are the table's own columns ('ingest' a constant on the branch of
  rows with no source), so Postgres pushes a filter into each branch, drops the
  branches whose constant cannot match, and the unique (source, external_id)
  index and work_items' (source_kind, source_id, task) index serve the lookup.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead', 'gone')"
NEW_STATUSES = (
    "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead', 'gone', 'parked')"
)


# The columns are the contract documented in the README (tests/integration/test_sync.py):
# 0007's columns, `stale` included, with the keys as plain columns.
_CURRENT = """
SELECT s.external_id,
       {source} AS source,
       w.source_kind,
       w.task,
       r.label,
       r.confidence,
       r.scores,
       r.output,
       r.model_name AS model,
       r.model_revision,
       r.created_at AS updated_at,
       EXISTS (
           SELECT 1 FROM sync_problems p
           WHERE p.refused AND p.source = s.source AND p.external_id = s.external_id
       ) AS stale
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN results r ON r.work_item_id = w.id
WHERE w.status = 'done' AND s.source IS {null}
"""
# An item being classified again serves its previous result, flagged stale (0007).
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
       true
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN LATERAL (
    SELECT * FROM result_history h
    WHERE h.work_item_id = w.id AND h.reason IN ('content_changed', 'rerun')
    ORDER BY h.id DESC LIMIT 1
) h ON true
WHERE w.status IN ('pending', 'queued', 'running', 'failed', 'dead', 'parked')
  AND s.source IS {null}
"""
LATEST_RESULTS = "CREATE VIEW fleet_latest_results AS" + "UNION ALL".join(
    branch.format(source=source, table=table, kind=kind, null=null)
    for branch in (_CURRENT, _PREVIOUS)
    for table, kind in (("conversations", "conversation"), ("audio_files", "audio"))
    for source, null in (("s.source", "NOT NULL"), ("CAST('ingest' AS varchar(64))", "NULL"))
)

# 0007's view, restored on downgrade.
OLD_LATEST_RESULTS = """
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
       r.created_at AS updated_at,
       EXISTS (
           SELECT 1 FROM sync_problems p
           WHERE p.refused AND p.source = COALESCE(c.source, a.source)
             AND p.external_id = COALESCE(c.external_id, a.external_id)
       ) AS stale
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
WHERE w.status = 'done'
UNION ALL
SELECT COALESCE(c.external_id, a.external_id),
       COALESCE(c.source, a.source, 'ingest'),
       w.source_kind,
       w.task,
       h.label,
       h.confidence,
       h.scores,
       h.output,
       h.model_name,
       h.model_revision,
       h.classified_at,
       true
FROM work_items w
JOIN LATERAL (
    SELECT * FROM result_history h
    WHERE h.work_item_id = w.id AND h.reason IN ('content_changed', 'rerun')
    ORDER BY h.id DESC LIMIT 1
) h ON true
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
WHERE w.status IN ('pending', 'queued', 'running', 'failed', 'dead')
"""


def upgrade() -> None:
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", NEW_STATUSES)
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(LATEST_RESULTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(OLD_LATEST_RESULTS)
    op.execute("UPDATE work_items SET status = 'failed' WHERE status = 'parked'")
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", OLD_STATUSES)
