"""fleet_latest_results: a lookup by (source, external_id, task) is served by
indexes (no sequential scan of the task's done items), for a synced source and
for `fleet ingest` rows, and returns the same rows as before. Real Postgres,
EXPLAIN of the planner's own plan over a few thousand rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from db.engine import transaction

FILL = [
    # 3000 conversations: 1000 each from sources app and crm, 1000 ingested (NULL source).
    """INSERT INTO conversations (external_id, messages, source)
       SELECT (i % 1000)::text, '[]'::jsonb,
              CASE i / 1000 WHEN 0 THEN 'app' WHEN 1 THEN 'crm' ELSE NULL END
       FROM generate_series(0, 2999) i""",
    """INSERT INTO audio_files (external_id, uri, source)
       SELECT (i % 500)::text, 'a' || i || '.wav', CASE WHEN i < 500 THEN 'calls' END
       FROM generate_series(0, 999) i""",
    """INSERT INTO work_items (source_kind, source_id, task, status)
       SELECT 'conversation', c.id, t, 'done' FROM conversations c,
              unnest(ARRAY['intent', 'sentiment']) t""",
    """INSERT INTO work_items (source_kind, source_id, task, status)
       SELECT 'audio', a.id, 'transcribe', 'done' FROM audio_files a""",
    """INSERT INTO results (work_item_id, label, confidence, model_name, model_tier, device,
                            latency_ms)
       SELECT w.id, w.task || '-' || w.source_id, 0.9, 'm', 0, 'cpu', 1.0 FROM work_items w""",
    "ANALYZE conversations",
    "ANALYZE audio_files",
    "ANALYZE work_items",
    "ANALYZE results",
]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


@pytest.fixture
def filled(db_url: str) -> str:
    with transaction(db_url) as s:
        for sql in FILL:
            s.execute(text(sql))
    return db_url


@pytest.mark.parametrize(
    ("source", "external_id", "task", "table"),
    [
        ("app", "17", "intent", "conversations"),
        ("ingest", "17", "sentiment", "conversations"),
        ("calls", "42", "transcribe", "audio_files"),
    ],
)
def test_a_lookup_by_its_keys_uses_indexes(filled, source, external_id, task, table):
    query = (
        "SELECT * FROM fleet_latest_results "
        "WHERE source = :source AND external_id = :external_id AND task = :task"
    )
    params = {"source": source, "external_id": external_id, "task": task}
    with transaction(filled) as s:
        (plan,) = s.execute(text("EXPLAIN (FORMAT JSON) " + query), params).scalar_one()
        rows = s.execute(text(query), params).mappings().all()
    nodes = _nodes(plan["Plan"])
    scans = [(n["Node Type"], n.get("Relation Name")) for n in nodes if "Relation Name" in n]
    assert not [sc for sc in scans if sc[0] == "Seq Scan"], json.dumps(plan, indent=1)
    keyed = [n for n in nodes if n.get("Relation Name") == table and "Index Cond" in n]
    assert keyed and "external_id" in keyed[0]["Index Cond"], json.dumps(plan, indent=1)
    assert len(rows) == 1
    assert (rows[0]["source"], rows[0]["external_id"], rows[0]["task"]) == (
        source,
        external_id,
        task,
    )


def test_the_view_holds_every_done_result_once(filled):
    with transaction(filled) as s:
        by_source = dict(
            s.execute(text("SELECT source, count(*) FROM fleet_latest_results GROUP BY 1")).all()
        )
        types = dict(
            s.execute(
                text(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = 'fleet_latest_results'"
                )
            ).all()
        )
    assert by_source == {"app": 2000, "crm": 2000, "ingest": 2000 + 500, "calls": 500}
    assert types["source"] == "character varying" and types["external_id"] == "character varying"
