"""Every query of the review loop: confirmed labels, review holds, candidates to review.

Items are named the way people and exports name them: (source, external_id),
where source is a `[sources.<name>]` name or 'ingest' for rows `fleet ingest`
read (as in fleet_latest_results). A confirmed label is keyed by the source row
and the task, so it outlives a rerun, a new model and the work item itself.

    fleet review export ── candidates() ── hold() ──► review_holds (until expires_at)
    fleet review import ── resolve_items() ── confirm() ──► confirmed_labels
                                                     └─► release(): the hold ends
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.ledger import _rowcount, id_array

_SOURCE = "COALESCE(c.source, a.source, 'ingest')"
_JOIN_SOURCES = """
    LEFT JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
    LEFT JOIN audio_files a ON w.source_kind = 'audio' AND a.id = w.source_id"""


@dataclass(frozen=True)
class ItemRef:
    """One stored item of a task as an import sees it: its row, and the model's answer now."""

    item_id: int
    source_kind: str
    source_id: int
    source: str
    external_id: str
    model_label: str | None
    model_name: str | None
    model_revision: str | None


@dataclass(frozen=True)
class Confirmation:
    """A reviewed label for one item, ready to store."""

    item: ItemRef
    label: str
    reviewer: str | None


def resolve_items(
    session: Session, *, task: str, keys: Sequence[tuple[str | None, str]]
) -> dict[tuple[str | None, str], list[ItemRef]]:
    """{(source, external_id): [ItemRef, ...]} for the task's items these keys name.

    A key whose source is None names the id in any source: it may match more than
    one item (the caller reports it as ambiguous). Keys with no item are absent."""
    if not keys:
        return {}
    ids = sorted({eid for _, eid in keys})
    rows = session.execute(
        text(
            f"""
            SELECT w.id, w.source_kind, w.source_id, {_SOURCE} AS source,
                   COALESCE(c.external_id, a.external_id) AS external_id,
                   r.label, r.model_name, r.model_revision
            FROM work_items w {_JOIN_SOURCES}
            LEFT JOIN results r ON r.work_item_id = w.id
            WHERE w.task = :task
              AND COALESCE(c.external_id, a.external_id) = ANY(CAST(:ids AS text[]))
            """
        ),
        {"task": task, "ids": ids},
    )
    by_id: dict[str, list[ItemRef]] = {}
    for row in rows:
        ref = ItemRef(int(row[0]), row[1], int(row[2]), row[3], row[4], row[5], row[6], row[7])
        by_id.setdefault(ref.external_id, []).append(ref)
    out: dict[tuple[str | None, str], list[ItemRef]] = {}
    for source, eid in keys:
        found = [r for r in by_id.get(eid, []) if source is None or r.source == source]
        if found:
            out[(source, eid)] = found
    return out


def confirm(
    session: Session, *, task: str, confirmations: Sequence[Confirmation], origin: str | None
) -> int:
    """Store reviewed labels (a newer review of the same row and task replaces the older)
    and end those items' review holds. Returns how many labels were written."""
    if not confirmations:
        return 0
    params = [
        {
            "kind": c.item.source_kind,
            "sid": c.item.source_id,
            "task": task,
            "label": c.label,
            "reviewer": c.reviewer,
            "model_label": c.item.model_label,
            "model_name": c.item.model_name,
            "model_revision": c.item.model_revision,
            "origin": origin,
        }
        for c in confirmations
    ]
    session.execute(
        text(
            """
            INSERT INTO confirmed_labels (source_kind, source_id, task, label, reviewer,
                                          model_label, model_name, model_revision, origin)
            VALUES (:kind, :sid, :task, :label, :reviewer, :model_label, :model_name,
                    :model_revision, :origin)
            ON CONFLICT ON CONSTRAINT uq_confirmed_labels_source_task DO UPDATE SET
                label = EXCLUDED.label, reviewer = EXCLUDED.reviewer, confirmed_at = now(),
                model_label = EXCLUDED.model_label, model_name = EXCLUDED.model_name,
                model_revision = EXCLUDED.model_revision, origin = EXCLUDED.origin
            """
        ),
        params,
    )
    release(session, task=task, item_ids=[c.item.item_id for c in confirmations])
    return len(params)


def confirmed_labels(session: Session, *, task: str) -> list[dict[str, Any]]:
    """The task's confirmed labels with the item they name: work_item_id (None when the
    item is gone), source, external_id, source_kind, source_id, label, reviewer,
    confirmed_at, model_label (the answer reviewed), model_now (the stored answer now)."""
    rows = session.execute(
        text(
            """
            SELECT w.id AS work_item_id,
                   COALESCE(c.source, a.source, 'ingest') AS source,
                   COALESCE(c.external_id, a.external_id) AS external_id,
                   cl.source_kind, cl.source_id, cl.label, cl.reviewer, cl.confirmed_at,
                   cl.model_label, r.label AS model_now
            FROM confirmed_labels cl
            LEFT JOIN conversations c ON cl.source_kind = 'conversation' AND c.id = cl.source_id
            LEFT JOIN audio_files a ON cl.source_kind = 'audio' AND a.id = cl.source_id
            LEFT JOIN work_items w ON w.source_kind = cl.source_kind
                 AND w.source_id = cl.source_id AND w.task = cl.task
            LEFT JOIN results r ON r.work_item_id = w.id
            WHERE cl.task = :task
            ORDER BY cl.id
            """
        ),
        {"task": task},
    )
    return [dict(r) for r in rows.mappings()]


def agreement(session: Session, *, task: str) -> dict[str, dict[str, int]]:
    """Per reviewed label: {label: {"reviewed": n, "agreed": k}}, where agreed counts
    reviews whose label equals the model answer they reviewed (model_label)."""
    rows = session.execute(
        text(
            """
            SELECT label, COUNT(*), COUNT(*) FILTER (WHERE model_label = label)
            FROM confirmed_labels WHERE task = :task GROUP BY label ORDER BY label
            """
        ),
        {"task": task},
    )
    return {str(r[0]): {"reviewed": int(r[1]), "agreed": int(r[2])} for r in rows}


def candidates(
    session: Session,
    *,
    task: str,
    since: dt.datetime | None = None,
    source: str | None = None,
    batch: int = 5000,
) -> Iterator[dict[str, Any]]:
    """The task's done items that may go out for review: not confirmed, not held by an
    unexpired hold; with source, external_id, source_kind, source_id, label,
    confidence and scores ({label: probability}). Streams in id order."""
    clauses = [
        "w.task = :task",
        "w.status = 'done'",
        "NOT EXISTS (SELECT 1 FROM review_holds h WHERE h.work_item_id = w.id "
        "AND h.expires_at > now())",
        "NOT EXISTS (SELECT 1 FROM confirmed_labels cl WHERE cl.task = w.task "
        "AND cl.source_kind = w.source_kind AND cl.source_id = w.source_id)",
    ]
    params: dict[str, Any] = {"task": task}
    if since is not None:
        clauses.append("r.created_at >= :since")
        params["since"] = since
    if source is not None:
        clauses.append(f"{_SOURCE} = :source")
        params["source"] = source
    result = session.execute(
        text(
            f"""
            SELECT w.id AS item_id, {_SOURCE} AS source,
                   COALESCE(c.external_id, a.external_id) AS external_id,
                   w.source_kind, w.source_id, r.label, r.confidence, r.scores
            FROM work_items w JOIN results r ON r.work_item_id = w.id {_JOIN_SOURCES}
            WHERE {" AND ".join(clauses)}
            ORDER BY w.id
            """
        ).execution_options(yield_per=batch),
        params,
    )
    for row in result.mappings():
        yield dict(row)


def labels_of_task(
    session: Session, *, task: str, item_keys: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], str | None]:
    """{(source_kind, source_id): stored label} of another task on the same source rows."""
    if not item_keys:
        return {}
    out: dict[tuple[str, int], str | None] = {}
    for kind in {k for k, _ in item_keys}:
        ids = [i for k, i in item_keys if k == kind]
        rows = session.execute(
            text(
                """
                SELECT w.source_id, r.label FROM work_items w
                JOIN results r ON r.work_item_id = w.id
                WHERE w.task = :task AND w.source_kind = :kind
                  AND w.source_id = ANY(CAST(:ids AS bigint[]))
                """
            ),
            {"task": task, "kind": kind, "ids": id_array(ids)},
        )
        out.update({(kind, int(r[0])): r[1] for r in rows})
    return out


def hold(
    session: Session,
    *,
    task: str,
    item_ids: Sequence[int],
    export_id: str,
    strategy: str,
    expires_at: dt.datetime,
) -> list[int]:
    """Mark items out for review until `expires_at`. An item already held by an
    unexpired hold is not taken (two exports racing get disjoint items); returns
    the ids this export now holds."""
    if not item_ids:
        return []
    rows = session.execute(
        text(
            """
            INSERT INTO review_holds (work_item_id, task, export_id, strategy, expires_at)
            SELECT id, :task, :export_id, :strategy, :expires_at
            FROM unnest(CAST(:ids AS bigint[])) AS id
            ON CONFLICT (work_item_id) DO UPDATE SET
                export_id = EXCLUDED.export_id, strategy = EXCLUDED.strategy,
                held_at = now(), expires_at = EXCLUDED.expires_at
            WHERE review_holds.expires_at <= now()
            RETURNING work_item_id
            """
        ),
        {
            "task": task,
            "export_id": export_id,
            "strategy": strategy,
            "expires_at": expires_at,
            "ids": id_array(item_ids),
        },
    )
    return [int(r[0]) for r in rows]


def release(
    session: Session,
    *,
    task: str,
    item_ids: Sequence[int] | None = None,
    export_id: str | None = None,
) -> int:
    """End review holds: of these items, of one export, or (neither) all of the task's."""
    clauses, params = ["task = :task"], {"task": task}
    if item_ids is not None:
        clauses.append("work_item_id = ANY(CAST(:ids AS bigint[]))")
        params["ids"] = id_array(item_ids)
    if export_id is not None:
        clauses.append("export_id = :export_id")
        params["export_id"] = export_id
    return _rowcount(
        session.execute(text(f"DELETE FROM review_holds WHERE {' AND '.join(clauses)}"), params)
    )


def held_count(session: Session, *, task: str) -> int:
    """Items of the task out for review now (unexpired holds)."""
    return int(
        session.execute(
            text("SELECT COUNT(*) FROM review_holds WHERE task = :task AND expires_at > now()"),
            {"task": task},
        ).scalar_one()
    )
