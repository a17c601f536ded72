"""Read-only queries for people and exports: each item of a task with its result."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import text

from db.engine import get_engine

# A task's work items with their source rows, and the source's name ('ingest':
# rows `fleet ingest` read, as in the fleet_latest_results view).
_SOURCE = "COALESCE(c.source, a.source, 'ingest')"
_ITEMS_AND_SOURCES = """
        FROM work_items w
        LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
        LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id"""


def iter_results(
    url: str,
    *,
    task: str,
    status: str = "all",
    limit: int | None = None,
    source: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Items of a task in id order with source id, state, error and result,
    streamed from a server-side cursor (exports of millions stay flat in memory).

    external_id is unique per source only, so each row carries `source`: the
    `[sources.<name>]` name, or 'ingest' for rows `fleet ingest` read from files
    (as in the fleet_latest_results view). `source` keeps only that source's items."""
    status_sql = "" if status == "all" else "AND w.status = :status"
    source_sql = "" if source is None else f"AND {_SOURCE} = :source"
    limit_sql = "" if limit is None else "LIMIT :limit"
    sql = text(
        f"""
        SELECT w.id AS item_id, COALESCE(c.external_id, a.external_id) AS external_id,
               {_SOURCE} AS source, w.source_kind, w.task, w.status, r.label, r.confidence, r.scores, r.output,
               r.model_name, r.model_tier, r.device, r.latency_ms, w.last_error AS error,
               c.meta AS conversation_meta
        {_ITEMS_AND_SOURCES}
        LEFT JOIN results r ON r.work_item_id = w.id
        WHERE w.task = :task {status_sql} {source_sql}
        ORDER BY w.id
        {limit_sql}
        """
    )
    with get_engine(url).connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=2000).execute(
            sql, {"task": task, "status": status, "limit": limit, "source": source}
        )
        for row in result.mappings():
            yield dict(row)


def task_sources(url: str, *, task: str) -> list[str]:
    """The sources a task's items come from, sorted: `[sources.<name>]` names,
    and 'ingest' for rows `fleet ingest` read from files."""
    sql = text(f"SELECT DISTINCT {_SOURCE} {_ITEMS_AND_SOURCES} WHERE w.task = :task ORDER BY 1")
    with get_engine(url).connect() as conn:
        return [str(s) for s in conn.execute(sql, {"task": task}).scalars()]


def fetch_results(
    url: str, *, task: str, status: str = "all", limit: int | None = 50, source: str | None = None
) -> list[dict[str, Any]]:
    """iter_results as a list: the first `limit` items (all with None)."""
    return list(iter_results(url, task=task, status=status, limit=limit, source=source))
