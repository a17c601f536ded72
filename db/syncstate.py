"""Each declared source's sync state, as `fleet status`, `fleet metrics` and the
HTML report show it: when it last synced (its lag), why its last pass failed,
how many of its rows the sync refused or took with a note (sync_problems),
how many a mass-delete guard withheld, and how many rows it synced that no
task has a work item for yet (they wait for the next `fleet run` / nightly).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

PROBLEMS_SQL = """
SELECT source, external_id, reason, refused, first_seen, last_seen FROM sync_problems
ORDER BY refused DESC, last_seen DESC LIMIT :limit
"""

SOURCES_SQL = """
WITH names AS (SELECT source FROM sync_state UNION SELECT source FROM sync_problems),
problems AS (
    SELECT source, count(*) FILTER (WHERE refused) AS refused,
           count(*) FILTER (WHERE NOT refused) AS noted
    FROM sync_problems GROUP BY source
),
waiting AS (
    SELECT s.source, count(*) AS n FROM conversations s
    WHERE s.source = ANY(CAST(:names AS text[])) AND s.gone_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM work_items w WHERE w.source_kind = 'conversation' AND w.source_id = s.id)
    GROUP BY s.source
    UNION ALL
    SELECT s.source, count(*) FROM audio_files s
    WHERE s.source = ANY(CAST(:names AS text[])) AND s.gone_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM work_items w WHERE w.source_kind = 'audio' AND w.source_id = s.id)
    GROUP BY s.source
)
SELECT n.source, st.last_sync_at, st.last_error,
       extract(epoch FROM now() - st.last_sync_at) AS lag_seconds,
       COALESCE(p.refused, 0) AS refused, COALESCE(p.noted, 0) AS noted,
       COALESCE((SELECT sum(w.n) FROM waiting w WHERE w.source = n.source), 0) AS undiscovered,
       COALESCE(CAST(st.counts ->> 'withheld' AS int), 0) AS withheld
FROM names n
LEFT JOIN sync_state st ON st.source = n.source
LEFT JOIN problems p ON p.source = n.source
ORDER BY n.source
"""


@dataclass(frozen=True)
class SourceStatus:
    """One source. lag_seconds: since its last successful pass (None: never)."""

    source: str
    last_sync_at: dt.datetime | None
    lag_seconds: float | None
    last_error: str | None
    refused: int
    noted: int
    undiscovered: int
    withheld: int

    def to_json(self) -> dict[str, Any]:
        return {
            "last_sync_at": self.last_sync_at.isoformat() if self.last_sync_at else None,
            "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds, 1),
            "last_error": self.last_error,
            "rows_refused": self.refused,
            "rows_with_note": self.noted,
            "rows_not_discovered": self.undiscovered,
            "rows_withheld_from_delete": self.withheld,
        }


def read_sources(session: Session) -> dict[str, SourceStatus]:
    """Every source that has synced (or tried to), by name."""
    names = list(
        session.execute(
            text("SELECT source FROM sync_state UNION SELECT source FROM sync_problems")
        ).scalars()
    )
    if not names:
        return {}
    return {
        r.source: SourceStatus(
            r.source,
            r.last_sync_at,
            None if r.lag_seconds is None else float(r.lag_seconds),
            r.last_error,
            int(r.refused),
            int(r.noted),
            int(r.undiscovered),
            int(r.withheld),
        )
        for r in session.execute(text(SOURCES_SQL), {"names": names})
    }


def read_problems(session: Session, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest sync_problems rows (refused first), as plain dicts."""
    return [dict(r._mapping) for r in session.execute(text(PROBLEMS_SQL), {"limit": limit})]
