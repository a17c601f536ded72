"""drop ix_work_items_task_status_id: ix_work_items_claim serves the same lookups

ix_work_items_claim (task, status, size_hint, id) answers every query that
filtered by (task, status) through the dropped index (claims, counts,
status lists), so the dropped one only cost an extra index write on every
state change of every item: three per item on its way to done.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 06:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_work_items_task_status_id", table_name="work_items")


def downgrade() -> None:
    op.create_index(
        "ix_work_items_task_status_id", "work_items", ["task", "status", "id"], unique=False
    )
