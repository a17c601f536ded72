"""sources synced from the user's database, result history, model revisions

- conversations / audio_files: source, content_hash, source_updated_at, gone_at
  (rows `fleet sync` copies from a declared source; NULL source: `fleet ingest`)
- work_items.status may be 'gone' (the source row disappeared)
- results.model_revision (snapshot commit or folder content hash)
- result_history: results replaced by a content change, a rerun or a gone row
- sync_state: the per-source watermark
- the fleet_latest_results view: the stable contract an application joins to

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead')"
NEW_STATUSES = "status IN ('pending', 'queued', 'running', 'done', 'failed', 'dead', 'gone')"

# A view is not ORM metadata, so `alembic check` neither creates nor flags it; the
# columns are the contract documented in the README (tests/integration/test_sync.py).
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
       r.created_at AS updated_at
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
WHERE w.status = 'done'
"""


def _source_columns(table: str) -> None:
    op.add_column(table, sa.Column("source", sa.String(length=64), nullable=True))
    op.add_column(table, sa.Column("content_hash", sa.String(length=64), nullable=True))
    op.add_column(table, sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(table, sa.Column("gone_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(f"ix_{table}_source", table, ["source", "external_id"], unique=False)


def upgrade() -> None:
    _source_columns("conversations")
    _source_columns("audio_files")
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", NEW_STATUSES)
    op.add_column("results", sa.Column("model_revision", sa.String(length=128), nullable=True))
    op.create_table(
        "result_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("work_item_id", sa.BigInteger(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("source_id", sa.BigInteger(), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=True),
        sa.Column("label", sa.String(length=256), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("scores", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("model_revision", sa.String(length=128), nullable=True),
        sa.Column("model_tier", sa.Integer(), nullable=False),
        sa.Column("classified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "replaced_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_history")),
    )
    op.create_index("ix_result_history_item", "result_history", ["work_item_id"], unique=False)
    op.create_table(
        "sync_state",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sync_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_full_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "counts", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_sync_state")),
    )
    op.execute(LATEST_RESULTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.drop_table("sync_state")
    op.drop_index("ix_result_history_item", table_name="result_history")
    op.drop_table("result_history")
    op.drop_column("results", "model_revision")
    op.execute("UPDATE work_items SET status = 'failed' WHERE status = 'gone'")
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", OLD_STATUSES)
    for table in ("audio_files", "conversations"):
        op.drop_index(f"ix_{table}_source", table_name=table)
        for column in ("gone_at", "source_updated_at", "content_hash", "source"):
            op.drop_column(table, column)
