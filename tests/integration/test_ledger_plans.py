"""The plans of the ledger's per-item statements on the real Postgres: with
tens of thousands of items in flight, the statements that read or change a
known list of items (start, finish, split, dead) find their rows by primary
key, in custom and generic plans, whether the statistics were taken on a
settled backlog (nothing in flight) or mid-run; a chunk start and the
heartbeat touch no item row at all."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

from db import ledger
from db.engine import get_engine, session_factory, transaction

ITEMS = 100_000
IN_FLIGHT = 5 * 8192  # five large messages claimed ahead, as a busy fleet holds them


def _seed(url: str, *, analyze_mid_run: bool) -> list[ledger.ClaimedBatch]:
    """ITEMS pending items, then IN_FLIGHT of them claimed and the first batch's
    first chunk running. Statistics are taken before the claim (a settled
    backlog, what autovacuum last saw) or after it."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO work_items (source_kind, source_id, task, status, size_hint) "
            "SELECT 'conversation', g, 'intent', 'pending', hashint8(g) & 65535 "
            "FROM generate_series(1, %s) g",
            (ITEMS,),
        )
        c.execute(ledger.bucket_sql("work_items"))
        if not analyze_mid_run:
            c.execute("VACUUM ANALYZE work_items")
    with transaction(url) as s:
        batches = ledger.claim_batches(
            s, task="intent", limit=IN_FLIGHT, batch_size=8192, lease_seconds=600
        )
    if analyze_mid_run:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("VACUUM ANALYZE work_items")
    return batches


def _captured(url: str, call: Any, *, some: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The statements on work_items `call(session)` sends (as the driver gets
    them, with their parameters), run in a transaction that is rolled back."""
    got: list[tuple[str, dict[str, Any]]] = []
    engine = get_engine(url)

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        if re.search(r"\b(UPDATE|FROM) work_items\b", statement) and isinstance(params, dict):
            got.append((statement, dict(params)))

    event.listen(engine, "before_cursor_execute", record)
    try:
        session = session_factory(url)()
        try:
            call(session)
        finally:
            session.rollback()
            session.close()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert bool(got) == some, f"statements on work_items: {got}"
    return got


def _plans(url: str, statement: str, params: dict[str, Any]) -> dict[str, str]:
    """EXPLAIN of one statement as a custom plan (parameters as literals) and as
    the generic plan a prepared statement settles on."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    names: list[str] = []

    def placeholder(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    positional = re.sub(r"%\((\w+)\)s", placeholder, statement)
    with psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor) as c:
        custom = c.execute("EXPLAIN " + statement, params).fetchall()
        c.execute("SET plan_cache_mode = force_generic_plan")
        c.execute("PREPARE s AS " + positional.replace("%%", "%"))
        args = ", ".join(["%s"] * len(names))
        generic = c.execute(f"EXPLAIN EXECUTE s({args})", [params[n] for n in names]).fetchall()
    return {"custom": "\n".join(r[0] for r in custom), "generic": "\n".join(r[0] for r in generic)}


def _ways_into_work_items(plan: str) -> set[str]:
    """How a plan reaches work_items' rows: the indexes it scans ("Index Scan
    using X on work_items", a bitmap built from "Bitmap Index Scan on X"), and
    "sequential" for a Seq Scan."""
    ways = set(re.findall(r"Index (?:Only )?Scan using (\w+) on work_items\b", plan))
    ways |= set(re.findall(r"Bitmap Index Scan on (\w+)", plan))
    if re.search(r"Seq Scan on work_items\b", plan):
        ways.add("sequential")
    return ways


def _assert_by_index(url: str, call: Any, index: str = "pk_work_items") -> None:
    """Every statement on work_items that `call` sends reaches its rows through `index` only."""
    for statement, params in _captured(url, call):
        for kind, plan in _plans(url, statement, params).items():
            assert _ways_into_work_items(plan) == {index}, (
                f"{kind} plan of\n{statement}\nreads work_items otherwise:\n{plan}"
            )


def _outcomes(ids: list[int]) -> list[ledger.Outcome]:
    result = {
        "label": "a",
        "confidence": 0.9,
        "scores": {"a": 0.9},
        "output": None,
        "latency_ms": 1.0,
        "model_name": "m",
        "model_revision": None,
        "model_tier": 0,
        "device": "cpu",
    }
    return [
        ledger.Outcome(i, None, "boom") if i % 10 == 0 else ledger.Outcome(i, result) for i in ids
    ]


@pytest.mark.parametrize("analyze_mid_run", [False, True], ids=["settled-stats", "mid-run-stats"])
def test_ledger_statements_find_rows_by_key_with_many_in_flight(db_url, analyze_mid_run):
    batches = _seed(db_url, analyze_mid_run=analyze_mid_run)
    big = batches[-1]
    with transaction(db_url) as s:
        started = ledger.start_batch(
            s,
            batch_id=big.batch_id,
            item_ids=big.item_ids,
            worker="w",
            lease_seconds=600,
            by_chunk=True,
        )
    chunk = [it.item_id for it in started[:1024]]
    with transaction(db_url) as s:
        assert ledger.start_chunk(
            s, batch_id=big.batch_id, item_ids=chunk, worker="w", lease_seconds=600
        ) == set(chunk)
    with transaction(db_url) as s:
        counts = ledger.counts(s)["intent"]
        assert counts["queued"] + counts["running"] == IN_FLIGHT

    # Taking a chunk up and the heartbeat write the batch's row only.
    _captured(
        db_url,
        lambda s: ledger.start_chunk(
            s,
            batch_id=big.batch_id,
            item_ids=[it.item_id for it in started[1024:2048]],
            worker="w",
            lease_seconds=600,
        ),
        some=False,
    )
    _captured(
        db_url,
        lambda s: ledger.extend_lease(s, batch_id=big.batch_id, lease_seconds=600, worker="w"),
        some=False,
    )
    _assert_by_index(
        db_url,
        lambda s: ledger.finish_batch(
            s, batch_id=big.batch_id, outcomes=_outcomes(chunk), last=True
        ),
    )
    _assert_by_index(
        db_url,
        lambda s: ledger.mark_dead(s, batch_id=big.batch_id, item_ids=chunk, reason="poison"),
    )
    _assert_by_index(
        db_url,
        lambda s: ledger.split_batch(
            s,
            batch_id=big.batch_id,
            parts=[chunk[:512], chunk[512:]],
            lease_seconds=600,
            reset_deliveries=False,
        ),
    )
    _assert_by_index(
        db_url,
        lambda s: ledger.start_batch(
            s,
            batch_id=batches[1].batch_id,
            item_ids=batches[1].item_ids,
            worker="w",
            lease_seconds=600,
            by_chunk=True,
        ),
    )
    small = batches[0]  # a message started whole, as one of at most 1,024 items is
    ids = small.item_ids[:1024]
    _assert_by_index(
        db_url,
        lambda s: ledger.start_batch(
            s, batch_id=small.batch_id, item_ids=ids, worker="w", lease_seconds=600
        ),
    )
