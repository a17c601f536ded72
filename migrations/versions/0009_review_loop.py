"""the review loop: confirmed labels, items out for review, ladders set by promotion

- confirmed_labels: one reviewed label per (source row, task): the label, who
  gave it, when, and the model answer it confirmed or corrected
- review_holds: items handed out for review (`fleet review export`) until they
  are imported, released or the hold expires, so two exports never hand out
  the same item
- ladder_overrides: the ladder `fleet promote` set for a task (newest row not
  rolled back wins over the task config's ladder; `fleet rollback` marks it)
- fleet_latest_results gains `confirmed_label` (recreated whole: a view's
  columns cannot be added in place); an item put back by `fleet promote` keeps
  its result row while pending and serves it with `stale = true`

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0008's view (keys as plain columns, `stale`) with `confirmed_label`. After
# `fleet promote` an item is pending again with its old result row kept: that
# label is served, stale, until the new model's result replaces it.
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
       w.status <> 'done' OR EXISTS (
           SELECT 1 FROM sync_problems p
           WHERE p.refused AND p.source = s.source AND p.external_id = s.external_id
       ) AS stale,
       cl.label AS confirmed_label
FROM {table} s
JOIN work_items w ON w.source_kind = '{kind}' AND w.source_id = s.id
JOIN results r ON r.work_item_id = w.id
LEFT JOIN confirmed_labels cl
       ON cl.source_kind = w.source_kind AND cl.source_id = w.source_id AND cl.task = w.task
WHERE w.status IN ('done', 'pending', 'queued', 'running') AND s.source IS {null}
"""
# An item being classified again after an edit or `fleet rerun` (its result moved
# to result_history) serves that previous result, flagged stale (0007).
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
       cl.label
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
NEW_VIEW = "CREATE VIEW fleet_latest_results AS" + "UNION ALL".join(
    branch.format(source=source, table=table, kind=kind, null=null)
    for branch in (_CURRENT, _PREVIOUS)
    for table, kind in (("conversations", "conversation"), ("audio_files", "audio"))
    for source, null in (("s.source", "NOT NULL"), ("CAST('ingest' AS varchar(64))", "NULL"))
)


def _load_0008() -> Any:
    """Migration 0008's module, whose view a downgrade restores."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("0008_parked_and_lookup_keys.py")
    spec = importlib.util.spec_from_file_location("fleet_migration_0008", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    op.execute(_load_0008().LATEST_RESULTS)
    op.drop_index("ix_ladder_overrides_task", table_name="ladder_overrides")
    op.drop_table("ladder_overrides")
    op.drop_index("ix_review_holds_task", table_name="review_holds")
    op.drop_table("review_holds")
    op.drop_index("ix_confirmed_labels_task", table_name="confirmed_labels")
    op.drop_table("confirmed_labels")
