"""Migration 0006: result_history gets `source`, backfilled from the source rows
that still exist; a history row whose source row is gone keeps NULL."""

from __future__ import annotations

from sqlalchemy import inspect, text

from db.engine import get_engine, transaction
from db.migrate import downgrade, upgrade
from tests.support import create_database, drop_database


def _row(url: str, table: str, source: str | None, ext: str) -> int:
    extra = ("messages", "'[]'::jsonb") if table == "conversations" else ("uri", "'file:///x.wav'")
    with transaction(url) as s:
        return s.execute(
            text(
                f"INSERT INTO {table} (external_id, source, {extra[0]}) "
                f"VALUES (:e, :s, {extra[1]}) RETURNING id"
            ),
            {"e": ext, "s": source},
        ).scalar_one()


def _history(url: str, kind: str, source_id: int, ext: str) -> None:
    """A replaced result as 0005's db.history wrote it (no source column yet)."""
    with transaction(url) as s:
        s.execute(
            text(
                "INSERT INTO result_history (work_item_id, task, source_kind, source_id, "
                "external_id, label, model_name, model_tier, classified_at, reason) "
                "VALUES (:w, 'intent', :k, :sid, :e, 'a', 'm', 0, now(), 'content_changed')"
            ),
            # Work items that do not exist (any more): the backfill does not need them.
            {"w": 1000 + source_id, "k": kind, "sid": source_id, "e": ext},
        )


def test_backfill_and_downgrade():
    name, url = create_database()
    try:
        upgrade(url, "0005")
        app = _row(url, "conversations", "app", "1")
        crm = _row(url, "conversations", "crm", "1")
        ingested = _row(url, "conversations", None, "1")
        rec = _row(url, "audio_files", "rec", "1")  # audio ids overlap conversation ids
        for kind, sid in (("conversation", app), ("conversation", crm)):
            _history(url, kind, sid, "1")
        _history(url, "conversation", ingested, "1")
        _history(url, "audio", rec, "1")
        _history(url, "conversation", 999_999, "deleted")  # its source row was deleted

        upgrade(url)
        with transaction(url) as s:
            got = {
                (kind, sid): source
                for kind, sid, source in s.execute(
                    text("SELECT source_kind, source_id, source FROM result_history")
                )
            }
        assert got == {
            ("conversation", app): "app",
            ("conversation", crm): "crm",
            ("conversation", ingested): None,
            ("audio", rec): "rec",
            ("conversation", 999_999): None,
        }

        downgrade(url, "0005")
        cols = {c["name"] for c in inspect(get_engine(url)).get_columns("result_history")}
        assert "source" not in cols and "external_id" in cols
        upgrade(url)
    finally:
        drop_database(name)
