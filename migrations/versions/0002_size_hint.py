"""work_items.size_hint: claim in size order so batches hold similar lengths

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "work_items", sa.Column("size_hint", sa.BigInteger(), server_default="0", nullable=False)
    )
    # Existing items: sizes from their sources, so their claims are size-ordered too.
    op.execute(
        "UPDATE work_items w SET size_hint = octet_length(c.messages::text) "
        "FROM conversations c WHERE w.source_kind = 'conversation' AND c.id = w.source_id"
    )
    op.execute(
        "UPDATE work_items w SET size_hint = COALESCE(round(a.duration_s * 100), 0) "
        "FROM audio_files a WHERE w.source_kind = 'audio' AND a.id = w.source_id"
    )
    op.create_index(
        "ix_work_items_claim", "work_items", ["task", "status", "size_hint", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_work_items_claim", table_name="work_items")
    op.drop_column("work_items", "size_hint")
