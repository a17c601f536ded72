"""parked work items; fleet_latest_results keys an index serves

- work_items.status may be 'parked': a failed or dead item acknowledged as one
  that will never succeed (`fleet park`); downgrade makes them failed again.

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


def upgrade() -> None:
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", NEW_STATUSES)


def downgrade() -> None:
    op.execute("UPDATE work_items SET status = 'failed' WHERE status = 'parked'")
    op.drop_constraint(op.f("ck_work_items_status"), "work_items", type_="check")
    op.create_check_constraint(op.f("ck_work_items_status"), "work_items", OLD_STATUSES)
