"""sync_problems, sync_state.last_error

- sync_problems: one row per source row that the last pass reading it could not
  take as it is (refused, or stored with a note), with the reason and when it was
  first and last seen; db.sync deletes it once the row reads clean.
- sync_state.last_error / last_error_at: why the last pass of a source failed as
  a whole (NULL once a pass succeeds), shown by `fleet status` and metrics.
- fleet_latest_results gains `stale` (recreated whole, every column kept): an item
  put back to pending because its row was edited (or `fleet rerun`) keeps serving
  its previous result, stale = true, until the new one lands; a current result
  whose source row the last sync refused (sync_problems) is stale too.

Downgrade drops them and restores the view without `stale`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Columns in this order are the contract documented in the README
# (tests/integration/test_sync.py::test_view_columns_are_the_contract).
LATEST_RESULTS = """
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
    op.create_table(
        "sync_problems",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("refused", sa.Boolean(), nullable=False),
        sa.Column(
            "first_seen",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("source", "external_id", name=op.f("pk_sync_problems")),
    )
    op.add_column("sync_state", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column(
        "sync_state", sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(LATEST_RESULTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(OLD_LATEST_RESULTS)
    op.drop_column("sync_state", "last_error_at")
    op.drop_column("sync_state", "last_error")
    op.drop_table("sync_problems")
