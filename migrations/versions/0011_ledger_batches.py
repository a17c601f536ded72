"""the ledger's claims and leases move to work_queue buckets and batches rows

An item now costs one heap-only update of its work_items row (at finish) and
its result row; nothing per item at the claim or the start (db.ledger):

- work_queue: the pending items, in buckets of at most 224 ids in size order;
  a claim deletes whole buckets (FOR UPDATE SKIP LOCKED).
- batches: one row per open batch (claimed, not yet finished): its ids, its
  lease, the worker that started it, the starts it had (deliveries), the last
  id of the chunks taken up (started_upto), its counters (n_items,
  n_finished) and created_at (clock_timestamp() of the claim: an item reset
  after it is no longer the batch's own).
- work_items drops ix_work_items_claim, ix_work_items_lease and
  ix_work_items_batch (nothing the hot path writes is indexed any more, so the
  finish is a heap-only update) and gets fillfactor 85 (room on each page for
  that update; it applies to pages written from now on).

Run it on a drained fleet (no `fleet run`, workers idle). Upgrade: items
queued or running go back to pending (attempts and deliveries kept) and every
pending item is put in a bucket. Downgrade: the indexes come back; the items
of open batches become queued under their batch id and lease (the old
reconciler returns them when it expires), and the two tables go.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 08:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKET = 224  # db.ledgerqueue.BUCKET (a migration does not import application code)


def upgrade() -> None:
    op.create_table(
        "work_queue",
        sa.Column("bucket", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("min_size", sa.BigInteger(), nullable=False),
        sa.Column("item_ids", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.PrimaryKeyConstraint("bucket", name=op.f("pk_work_queue")),
    )
    op.create_index(
        "ix_work_queue_claim", "work_queue", ["task", "min_size", "bucket"], unique=False
    )
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.UUID(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("item_ids", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("n_finished", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("worker", sa.String(length=256), nullable=True),
        sa.Column("deliveries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_upto", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_batches")),
    )
    op.create_index("ix_batches_lease_until", "batches", ["lease_until"], unique=False)
    op.execute(
        "UPDATE work_items SET status = 'pending', batch_id = NULL, lease_until = NULL, "
        "worker = NULL WHERE status IN ('queued', 'running')"
    )
    op.execute(
        f"""
        INSERT INTO work_queue (task, min_size, item_ids)
        SELECT task, min(size_hint), array_agg(id ORDER BY size_hint, id)
        FROM (SELECT task, id, size_hint,
                     (row_number() OVER (PARTITION BY task ORDER BY size_hint, id) - 1)
                     / {BUCKET} AS k
              FROM work_items WHERE status = 'pending') AS cut
        GROUP BY task, k
        """
    )
    op.drop_index("ix_work_items_claim", table_name="work_items")
    op.drop_index("ix_work_items_lease", table_name="work_items")
    op.drop_index("ix_work_items_batch", table_name="work_items")
    op.execute("ALTER TABLE work_items SET (fillfactor = 85)")


def downgrade() -> None:
    op.execute("ALTER TABLE work_items RESET (fillfactor)")
    op.create_index(
        "ix_work_items_claim", "work_items", ["task", "status", "size_hint", "id"], unique=False
    )
    op.create_index(
        "ix_work_items_lease",
        "work_items",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
    op.create_index("ix_work_items_batch", "work_items", ["batch_id"], unique=False)
    op.execute(
        """
        UPDATE work_items w
        SET status = 'queued', batch_id = b.batch_id, lease_until = b.lease_until,
            attempts = w.attempts + 1
        FROM batches b, unnest(b.item_ids) AS u(id)
        WHERE w.id = u.id AND w.status = 'pending' AND w.updated_at <= b.created_at
        """
    )
    op.drop_index("ix_batches_lease_until", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_work_queue_claim", table_name="work_queue")
    op.drop_table("work_queue")
