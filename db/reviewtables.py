"""Tables of the review loop (migration 0014), beside db.schema on the same metadata.

- `ConfirmedLabel`: a person's label for one source row and task, with the
  model answer it confirmed or corrected (fleet.review.importer writes it).
- `ReviewHold`: an item handed out for review until imported, released or expired.
- `LadderOverride`: the ladder `fleet promote` set for a task; the newest row
  not rolled back overrides the task config's ladder (db.ladders).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from db.schema import Base


class ConfirmedLabel(Base):
    __tablename__ = "confirmed_labels"
    __table_args__ = (
        UniqueConstraint(
            "source_kind", "source_id", "task", name="uq_confirmed_labels_source_task"
        ),
        Index("ix_confirmed_labels_task", "task"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source_kind: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(256))
    reviewer: Mapped[str | None] = mapped_column(String(256))
    confirmed_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # The stored model answer when the label was imported: equal to `label` means
    # the reviewer confirmed it, different means corrected. NULL: no result yet.
    model_label: Mapped[str | None] = mapped_column(String(256))
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_revision: Mapped[str | None] = mapped_column(String(128))
    origin: Mapped[str | None] = mapped_column(String(512))  # the file it came from


class ReviewHold(Base):
    __tablename__ = "review_holds"
    __table_args__ = (Index("ix_review_holds_task", "task", "expires_at"),)

    work_item_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("work_items.id", ondelete="CASCADE"), primary_key=True
    )
    task: Mapped[str] = mapped_column(String(64))
    export_id: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(32))
    held_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class LadderOverride(Base):
    __tablename__ = "ladder_overrides"
    __table_args__ = (Index("ix_ladder_overrides_task", "task", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64))
    # [[tasks.T.ladder]] tables as JSON: [{"name": ..., "path": ..., ...}, ...]
    ladder: Mapped[list[Any]] = mapped_column()
    gates: Mapped[dict[str, Any]] = mapped_column(server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    rolled_back_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
