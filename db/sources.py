"""Reading and writing the backlog itself: conversations and audio files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.ledger import id_array
from db.schema import AudioFile, Conversation


def ingest_conversations(session: Session, records: Sequence[dict[str, Any]]) -> int:
    """Insert file-ingested conversations (NULL source): dicts of Conversation's
    columns, without `source`. An external_id already ingested is left as it is;
    one that only a `fleet sync` source holds is a different row (ids are unique
    per source: uq_conversations_source_external_id). Returns the rows inserted."""
    if not records:
        return 0
    stmt = (
        insert(Conversation)
        .values(list(records))
        .on_conflict_do_nothing(index_elements=[Conversation.source, Conversation.external_id])
        .returning(Conversation.id)
    )
    return len(session.execute(stmt).all())


def ingest_audio(session: Session, records: Sequence[dict[str, Any]]) -> int:
    """Insert file-ingested audio files (NULL source), as ingest_conversations does;
    returns the rows inserted."""
    if not records:
        return 0
    stmt = (
        insert(AudioFile)
        .values(list(records))
        .on_conflict_do_nothing(index_elements=[AudioFile.source, AudioFile.external_id])
        .returning(AudioFile.id)
    )
    return len(session.execute(stmt).all())


def load_inputs(
    session: Session,
    refs: Sequence[tuple[int, str, int]],
    *,
    text_from_task: str | None = None,
) -> dict[int, tuple[str, dict[str, Any]]]:
    """{item_id: (external_id, data)} for (item_id, source_kind, source_id) refs.

    With `text_from_task`, the input is the transcript another task wrote for the
    same source (e.g. intent of a transcribed audio file), not the source itself.
    """
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for item_id, kind, source_id in refs:
        by_kind.setdefault(kind, []).append((item_id, source_id))
    for kind, pairs in by_kind.items():
        ids = [sid for _, sid in pairs]
        literal = id_array(ids)
        # Core SQL with one array parameter, not ORM entities with an IN list:
        # a large batch's inputs load at bulk speed (bench/ceiling.py).
        if kind == "conversation":
            rows = {
                r[0]: (r[1], {"messages": r[2], "language": r[3]})
                for r in session.execute(
                    text(
                        "SELECT id, external_id, messages, language FROM conversations "
                        "WHERE id = ANY(CAST(:ids AS bigint[]))"
                    ),
                    {"ids": literal},
                )
            }
        else:
            rows = {
                r[0]: (r[1], {"uri": r[2], "duration_s": r[3]})
                for r in session.execute(
                    text(
                        "SELECT id, external_id, uri, duration_s FROM audio_files "
                        "WHERE id = ANY(CAST(:ids AS bigint[]))"
                    ),
                    {"ids": literal},
                )
            }
        if text_from_task:
            texts: dict[int, str | None] = dict(
                session.execute(
                    text(
                        """
                        SELECT w.source_id, r.output ->> 'transcript'
                        FROM work_items w JOIN results r ON r.work_item_id = w.id
                        WHERE w.task = :task AND w.source_kind = :kind AND w.status = 'done'
                          AND w.source_id = ANY(CAST(:ids AS bigint[]))
                        """
                    ),
                    {"task": text_from_task, "kind": kind, "ids": literal},
                ).all()
            )
            rows = {sid: (ext, {"text": texts.get(sid)}) for sid, (ext, _) in rows.items()}
        for item_id, source_id in pairs:
            if source_id in rows:
                out[item_id] = rows[source_id]
    return out


def first_source_ids(session: Session, *, kind: str, limit: int) -> list[int]:
    table = {"conversation": "conversations", "audio": "audio_files"}[kind]
    return list(
        session.execute(
            text(f"SELECT id FROM {table} ORDER BY id LIMIT :n"), {"n": limit}
        ).scalars()
    )
