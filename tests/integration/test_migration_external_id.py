"""Migration 0005: external_id is unique per source (NULL source: one namespace
of its own), and its downgrade refuses while two sources share an id."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from db.engine import get_engine, transaction
from db.migrate import downgrade, upgrade
from tests.support import create_database, drop_database


def _add(url: str, source: str | None, ext: str) -> None:
    with transaction(url) as s:
        s.execute(
            text(
                "INSERT INTO conversations (external_id, source, messages) "
                "VALUES (:e, :s, '[]'::jsonb)"
            ),
            {"e": ext, "s": source},
        )


def test_per_source_uniqueness_and_downgrade():
    name, url = create_database()
    try:
        upgrade(url)
        for source in ("a", "b", None):
            _add(url, source, "1")
        # The same id twice in one source, or twice among ingested rows, is refused.
        for source in ("a", None):
            with pytest.raises(IntegrityError, match="uq_conversations_source_external_id"):
                _add(url, source, "1")

        with pytest.raises(RuntimeError, match=r"cannot downgrade past 0005.*'1' \(3 rows\)"):
            downgrade(url, "0004")
        with transaction(url) as s:
            s.execute(text("DELETE FROM conversations WHERE source IS DISTINCT FROM 'a'"))
        downgrade(url, "0004")
        uniques = {
            u["name"]: u["column_names"]
            for u in inspect(get_engine(url)).get_unique_constraints("conversations")
        }
        assert uniques == {"uq_conversations_external_id": ["external_id"]}
        with pytest.raises(IntegrityError, match="uq_conversations_external_id"):
            _add(url, "b", "1")
        upgrade(url)
        _add(url, "b", "1")
    finally:
        drop_database(name)
