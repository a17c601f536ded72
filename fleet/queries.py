"""Read-only queries for people: results with their sources."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from db.engine import transaction


def fetch_results(
    url: str, *, task: str, status: str = "all", limit: int | None = 50
) -> list[dict[str, Any]]:
    status_sql = "" if status == "all" else "AND w.status = :status"
    limit_sql = "" if limit is None else "LIMIT :limit"
    with transaction(url) as session:
        rows = session.execute(
            text(
                f"""
                SELECT w.id AS item_id, w.status, w.last_error, w.source_kind,
                       COALESCE(c.external_id, a.external_id) AS external_id,
                       c.meta AS conversation_meta,
                       r.label, r.confidence, r.scores, r.output, r.model_name, r.model_tier,
                       r.device, r.latency_ms
                FROM work_items w
                LEFT JOIN results r ON r.work_item_id = w.id
                LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
                LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id
                WHERE w.task = :task {status_sql}
                ORDER BY w.id
                {limit_sql}
                """
            ),
            {"task": task, "status": status, "limit": limit},
        ).mappings()
        return [dict(r) for r in rows]
