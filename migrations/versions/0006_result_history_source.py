"""result_history remembers the source of the row a result came from

Since 0005 an external_id names a row only together with its source, but
result_history kept the external_id alone: once a work item and its source
row are deleted (`on_delete = "delete"` in a [sources.X] config) nobody could
tell which source a history row came from. It now has a `source` column, the
source row's `source` at the time the result was replaced (NULL: a row
`fleet ingest` read, shown as "ingest"), written by db.history.

The upgrade backfills it from the source rows that still exist, joined on the
history row's own source_kind/source_id (the work item's, copied when the
result was archived), so it needs neither the work item nor the external_id.
History rows whose source row was already deleted stay NULL: for them NULL
means "not known", not "ingest" (only `fleet sync` with `on_delete = "delete"`
deletes source rows, so they came from some [sources.X] source).

Downgrade drops the column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = {"conversation": "conversations", "audio": "audio_files"}


def upgrade() -> None:
    op.add_column("result_history", sa.Column("source", sa.String(length=64), nullable=True))
    for kind, table in TABLES.items():
        op.execute(
            sa.text(
                f"""
                UPDATE result_history h SET source = s.source
                FROM {table} s
                WHERE h.source_kind = :kind AND s.id = h.source_id AND s.source IS NOT NULL
                """
            ).bindparams(kind=kind)
        )


def downgrade() -> None:
    op.drop_column("result_history", "source")
