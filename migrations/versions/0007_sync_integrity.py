"""sync_problems, sync_state.last_error

- sync_problems: one row per source row that the last pass reading it could not
  take as it is (refused, or stored with a note), with the reason and when it was
  first and last seen; db.sync deletes it once the row reads clean.
- sync_state.last_error / last_error_at: why the last pass of a source failed as
  a whole (NULL once a pass succeeds), shown by `fleet status` and metrics.

Downgrade drops both.

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


def downgrade() -> None:
    op.drop_column("sync_state", "last_error_at")
    op.drop_column("sync_state", "last_error")
    op.drop_table("sync_problems")
