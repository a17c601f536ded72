"""The typed schema. Postgres is the source of truth; Alembic (migrations/)
is the only way it changes, and a test checks the two never drift."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Status(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    # The source row disappeared from its sync source (db.sync): not failed, not run again.
    GONE = "gone"
    # A failed or dead item someone acknowledged will never succeed (`fleet park`): its
    # last_error stays, it is not run again and no longer counts as failed work to act
    # on; `fleet retry --status parked` puts it back. Migration 0008.
    PARKED = "parked"


class SourceKind(enum.StrEnum):
    CONVERSATION = "conversation"
    AUDIO = "audio"


STATUSES = tuple(s.value for s in Status)
SOURCE_KINDS = tuple(k.value for k in SourceKind)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


class Conversation(Base):
    __tablename__ = "conversations"
    # external_id is unique per source (db.sync); NULL source (`fleet ingest`) is one
    # namespace of its own, hence NULLS NOT DISTINCT (Postgres 15+). Migration 0005.
    __table_args__ = (
        UniqueConstraint(
            "source",
            "external_id",
            name="uq_conversations_source_external_id",
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(256))
    messages: Mapped[list[Any]] = mapped_column(JSONB)
    language: Mapped[str | None] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Set by `fleet sync` (db.sync) for rows copied from a declared source; NULL for
    # rows `fleet ingest` read from files.
    source: Mapped[str | None] = mapped_column(String(64))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    source_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    gone_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AudioFile(Base):
    __tablename__ = "audio_files"
    # external_id is unique per source (db.sync); NULL source (`fleet ingest`) is one
    # namespace of its own, hence NULLS NOT DISTINCT (Postgres 15+). Migration 0005.
    __table_args__ = (
        UniqueConstraint(
            "source",
            "external_id",
            name="uq_audio_files_source_external_id",
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(256))
    uri: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    source: Mapped[str | None] = mapped_column(String(64))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    source_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    gone_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WorkItem(Base):
    """The work ledger: one row per (source, task). Redis only carries ids."""

    __tablename__ = "work_items"
    __table_args__ = (
        UniqueConstraint("source_kind", "source_id", "task", name="uq_work_items_source_task"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        CheckConstraint(_in("source_kind", SOURCE_KINDS), name="source_kind"),
        # No index on what the ledger's finish writes (status, batch_id, worker,
        # deliveries, lease_until, updated_at): it is a heap-only update, with
        # fillfactor 85 (migration 0012) leaving it room on the page. Claims read
        # work_queue; leases live on batches.
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source_kind: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default=Status.PENDING.value)
    # Batches of this item whose lease ran out after a worker had taken it up. Past
    # the limit the reconciler marks the item dead.
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Worker deaths counted against this item (found when its batch is started again
    # or its lease runs out), plus one for the delivery that finished it. Redis does
    # not count redeliveries; this does (poison isolation, workers.policy).
    deliveries: Mapped[int] = mapped_column(Integer, server_default="0")
    # Input size known at discovery (bytes of conversation JSON, centiseconds of
    # audio). Claims take items in size order, so a batch holds similar lengths
    # and its sub-batches carry little padding.
    size_hint: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The batch that finished it (an open batch's items are in batches.item_ids).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Written by the old ledger only (before migration 0012): leases are per batch.
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(256))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class WorkQueue(Base):
    """Pending items waiting for a claim, in buckets of at most
    db.ledgerqueue.BUCKET ids in (size_hint, id) order (migration 0012)."""

    __tablename__ = "work_queue"
    __table_args__ = (Index("ix_work_queue_claim", "task", "min_size", "bucket"),)

    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64))
    # The smallest size_hint in the bucket: claims take buckets in this order.
    min_size: Mapped[int] = mapped_column(BigInteger)
    item_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))


class Batch(Base):
    """An open batch: claimed, not yet finished, split, dead or expired (the row
    goes then). Its lease, worker and deliveries are per batch, not per item
    (migration 0012, db.ledger)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_lease_until", "lease_until"),)

    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    item_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    # Counters for ledger.counts: items claimed, items finished so far.
    n_items: Mapped[int] = mapped_column(Integer)
    n_finished: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_until: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(256))
    # Starts of this batch's message; above zero at a start, a worker died on it
    # (unless the start resumes after a transient error).
    deliveries: Mapped[int] = mapped_column(Integer, server_default="0")
    # Last id of the chunks taken up (items are taken up in id order): the suspects
    # when the worker dies. NULL: nothing taken up yet.
    started_upto: Mapped[int | None] = mapped_column(BigInteger)
    # clock_timestamp() of the claim: an item whose updated_at is later was reset
    # since, and is no longer this batch's.
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    work_item_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("work_items.id", ondelete="CASCADE"), unique=True
    )
    label: Mapped[str | None] = mapped_column(String(256))
    confidence: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    model_name: Mapped[str] = mapped_column(String(256))
    model_tier: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # The exact weights: a Hugging Face snapshot commit, or "sha256:<hex>" of a local
    # folder's files (wire.hub.model_revision). `fleet rerun` compares it.
    model_revision: Mapped[str | None] = mapped_column(String(128))


class ResultHistory(Base):
    """Results that were replaced: the content changed (`fleet sync`), the model
    changed (`fleet rerun`), or the source row went away. No foreign key: the
    history outlives a deleted work item."""

    __tablename__ = "result_history"
    __table_args__ = (Index("ix_result_history_item", "work_item_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    work_item_id: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(64))
    source_kind: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[int] = mapped_column(BigInteger)
    # The source row's `source` when the result was replaced: an external_id names
    # a row only together with it. NULL: a `fleet ingest` row (shown as "ingest"),
    # or, for a result replaced before migration 0006 whose source row was already
    # deleted, not known.
    source: Mapped[str | None] = mapped_column(String(64))
    external_id: Mapped[str | None] = mapped_column(String(256))
    label: Mapped[str | None] = mapped_column(String(256))
    confidence: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    model_name: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str | None] = mapped_column(String(128))
    model_tier: Mapped[int] = mapped_column(Integer)
    classified_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    replaced_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    reason: Mapped[str] = mapped_column(String(32))  # content_changed | rerun | gone


class SyncState(Base):
    """One row per declared source: where the last incremental sync stopped."""

    __tablename__ = "sync_state"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Greatest source updated_at seen; the next pass reads from it minus the overlap.
    watermark: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_sync_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_full_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    # Why the last pass of this source failed as a whole (NULL: it succeeded).
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class SyncProblem(Base):
    """A source row the last pass that read it could not take as it is (db.syncrows):
    refused (not stored; a stored copy keeps its old content) or stored with a note
    (a NULL cursor, a message with NULL content skipped, an identical repeat
    dropped). Deleted when a pass reads the row fixed; a full pass clears the rest."""

    __tablename__ = "sync_problems"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    # '' for rows that have no external_id at all.
    external_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    refused: Mapped[bool] = mapped_column()
    first_seen: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_seen: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class Run(Base):
    """A nightly or manual run of one task: when, and what it ended with."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(32))
    task: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
