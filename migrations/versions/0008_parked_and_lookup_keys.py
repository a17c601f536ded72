"""parked work items; fleet_latest_results keys an index serves

- work_items.status may be 'parked': a failed or dead item acknowledged as one
  that will never succeed (`fleet park`); downgrade makes them failed again.
- fleet_latest_results, recreated whole with the same columns: its keys are
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
Revises: 0006
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead', 'gone')"
NEW_STATUSES = (
    "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead', 'gone', 'parked')"
)


# The columns are the contract documented in the README (tests/integration/test_sync.py).
_BRANCH = """
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
       r.created_at AS updated_at
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN results r ON r.work_item_id = w.id
WHERE w.status = 'done' AND s.source IS {null}
"""
LATEST_RESULTS = "CREATE VIEW fleet_latest_results AS" + "UNION ALL".join(
    _BRANCH.format(source=source, table=table, kind=kind, null=null)
    for table, kind in (("conversations", "conversation"), ("audio_files", "audio"))
    for source, null in (("s.source", "NOT NULL"), ("CAST('ingest' AS varchar(64))", "NULL"))
)

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
       r.created_at AS updated_at
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
WHERE w.status = 'done'
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
