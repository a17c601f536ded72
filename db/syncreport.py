"""What one sync pass did (db.sync), and the error of a source that cannot be read."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any


class SyncError(RuntimeError):
    """A source cannot be read as declared (a missing column, a failing query)."""


@dataclass
class SyncReport:
    source: str
    full: bool
    read: int = 0  # source rows read (messages shape: message rows)
    records: int = 0  # conversations / audio files after folding
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    gone: int = 0
    deleted: int = 0
    returned: int = 0  # gone rows that came back
    restored: int = 0  # results of returned rows put back (same content)
    items_reset: int = 0
    withheld: int = 0  # rows a mass-delete guard kept (not marked gone)
    reread: int = 0  # conversations the key scan found with a message count changed
    bad: list[tuple[str, str]] = field(default_factory=list)  # refused: (external_id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # stored with a note
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the pass failed as a whole
    unreachable: bool = False  # ... because a database could not be reached
    watermark: dt.datetime | None = None
    greatest_read: dt.datetime | None = None
    seconds: float = 0.0
    read_seconds: float = 0.0  # content pass
    delete_scan_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("bad", "notes", "greatest_read")}
        d["watermark"] = self.watermark.isoformat() if self.watermark else None
        d["bad"] = [{"external_id": e, "reason": r} for e, r in self.bad[:100]]
        d["bad_count"] = len(self.bad)
        d["notes"] = [{"external_id": e, "note": r} for e, r in self.notes[:100]]
        d["notes_count"] = len(self.notes)
        return d
