"""the review loop: confirmed labels, items out for review, ladders set by promotion

- confirmed_labels: one reviewed label per (source row, task): the label, who
  gave it, when, and the model answer it confirmed or corrected
- review_holds: items handed out for review (`fleet review export`) until they
  are imported, released or the hold expires, so two exports never hand out
  the same item
- ladder_overrides: the ladder `fleet promote` set for a task (newest row not
  rolled back wins over the task config's ladder; `fleet rollback` marks it)
- fleet_latest_results gains `confirmed_label` (recreated whole: a view's
  columns cannot be added in place)

Revision ID: 0014
Revises: 0006
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VIEW_BODY = """
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
       r.created_at AS updated_at{extra}
FROM work_items w
JOIN results r ON r.work_item_id = w.id
LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id{join}
WHERE {where}
"""
# After `fleet promote` an item is pending again with its old result kept: the old
# label is served until the new model's result replaces it.
NEW_WHERE = "w.status IN ('done', 'pending', 'queued', 'running')"
CONFIRMED_JOIN = """
LEFT JOIN confirmed_labels cl
       ON cl.source_kind = w.source_kind AND cl.source_id = w.source_id AND cl.task = w.task"""
NEW_VIEW = "CREATE VIEW fleet_latest_results AS" + _VIEW_BODY.format(
    extra=",\n       cl.label AS confirmed_label", join=CONFIRMED_JOIN, where=NEW_WHERE
)
OLD_VIEW = "CREATE VIEW fleet_latest_results AS" + _VIEW_BODY.format(
    extra="", join="", where="w.status = 'done'"
)


def upgrade() -> None:
    op.create_table(
        "confirmed_labels",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("source_id", sa.BigInteger(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=256), nullable=False),
        sa.Column("reviewer", sa.String(length=256), nullable=True),
        sa.Column(
            "confirmed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("model_label", sa.String(length=256), nullable=True),
        sa.Column("model_name", sa.String(length=256), nullable=True),
        sa.Column("model_revision", sa.String(length=128), nullable=True),
        sa.Column("origin", sa.String(length=512), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_confirmed_labels")),
        sa.UniqueConstraint(
            "source_kind", "source_id", "task", name="uq_confirmed_labels_source_task"
        ),
    )
    op.create_index("ix_confirmed_labels_task", "confirmed_labels", ["task"], unique=False)
    op.create_table(
        "review_holds",
        sa.Column("work_item_id", sa.BigInteger(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("export_id", sa.String(length=64), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column(
            "held_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["work_item_id"],
            ["work_items.id"],
            name=op.f("fk_review_holds_work_item_id_work_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("work_item_id", name=op.f("pk_review_holds")),
    )
    op.create_index("ix_review_holds_task", "review_holds", ["task", "expires_at"], unique=False)
    op.create_table(
        "ladder_overrides",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("ladder", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "gates", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ladder_overrides")),
    )
    op.create_index("ix_ladder_overrides_task", "ladder_overrides", ["task", "id"], unique=False)
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(NEW_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fleet_latest_results")
    op.execute(OLD_VIEW)
    op.drop_index("ix_ladder_overrides_task", table_name="ladder_overrides")
    op.drop_table("ladder_overrides")
    op.drop_index("ix_review_holds_task", table_name="review_holds")
    op.drop_table("review_holds")
    op.drop_index("ix_confirmed_labels_task", table_name="confirmed_labels")
    op.drop_table("confirmed_labels")
