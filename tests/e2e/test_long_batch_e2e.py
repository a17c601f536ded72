"""A batch that runs longer than its lease, or than the broker's visibility
timeout, is a live batch, not a dead worker's: real slow workers."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.support import conversations, run_fleet, write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECONDS_PER_ITEM = 1.0
BATCH = 8  # 8 s a batch


def _slow_env(fleet, **settings: str) -> dict[str, str]:
    config = fleet.tmp / "slow.toml"
    config.write_text(
        "include_bundled = false\n"
        "[tasks.intent]\n"
        'kind = "fake"\n'
        'source = "conversation"\n'
        f"seconds_per_item = {SECONDS_PER_ITEM}\n"
        "[[tasks.intent.ladder]]\n"
        'name = "slow-fake"\n'
        'path = "tiny-big"\n'  # a real folder; the fake model only sleeps
        "max_length = 128\n"
        "max_batch_tokens = 100000\n"
    )
    return {
        **fleet.env,
        "FLEET_CONFIG_FILE": str(config),
        "FLEET_BATCH_SIZE": str(BATCH),
        **settings,
    }


def _ledger(url: str) -> dict[str, int]:
    with transaction(url) as s:
        row = s.execute(
            text(
                """
                SELECT count(*) FILTER (WHERE w.status = 'done') AS done,
                       count(r.id) AS results,
                       max(w.attempts) AS max_attempts,
                       max(w.deliveries) AS max_deliveries,
                       count(DISTINCT w.batch_id) AS batches
                FROM work_items w LEFT JOIN results r ON r.work_item_id = w.id
                WHERE w.task = 'intent'
                """
            )
        ).one()
    return dict(row._mapping)


def _run(fleet, env: dict[str, str], n: int, workers: int) -> str:
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(n))
    run_fleet(["ingest", "conversations", str(path)], env)
    started = []
    for _ in range(workers):
        w = fleet.worker(**{k: v for k, v in env.items() if k.startswith("FLEET_")})
        started.append(w)
    for w in started:
        w.wait_ready()
    out = run_fleet(["run", "--task", "intent", "--timeout", "240"], env)
    assert out.returncode == 0
    return "".join(w.log.read_text() for w in started)


def test_batch_longer_than_its_lease_keeps_it(fleet):
    """Lease 6 s, batches of 8 s, the reconciler every second: the heartbeat
    keeps each batch's lease, nothing is returned, split or run twice."""
    env = _slow_env(fleet, FLEET_LEASE_SECONDS="6", FLEET_RECONCILE_INTERVAL="1")
    logs = _run(fleet, env, n=2 * BATCH, workers=1)
    got = _ledger(fleet.db_url)
    assert got == {
        "done": 2 * BATCH,
        "results": 2 * BATCH,
        "max_attempts": 0,  # never reclaimed (attempts count leases lost after a start)
        "max_deliveries": 1,  # never started twice
        "batches": 2,  # never split
    }, logs[-3000:]
    assert "never finished (a worker died)" not in logs  # never split as a crash


def test_batch_longer_than_the_visibility_timeout_is_not_taken_for_a_crash(fleet):
    """Visibility timeout 5 s, one batch of 12 s, two workers on one queue: the
    broker hands the live batch's message to the idle worker after 5 s; it is
    acknowledged there as a duplicate, the live worker's results are kept,
    nothing is split, counted as a death or run twice."""
    env = _slow_env(
        fleet, FLEET_VISIBILITY_TIMEOUT="5", FLEET_LEASE_SECONDS="60", FLEET_BATCH_SIZE="12"
    )
    logs = _run(fleet, env, n=12, workers=2)
    got = _ledger(fleet.db_url)
    assert got == {
        "done": 12,
        "results": 12,
        "max_attempts": 0,
        "max_deliveries": 1,
        "batches": 1,
    }, logs[-3000:]
    assert "never finished (a worker died)" not in logs  # never split as a crash
    assert "this delivery is a duplicate" in logs  # the redelivery did happen, and was seen
    done_lines = re.findall(r'"event": "batch".*?"done": (\d+)', logs)
    assert [int(d) for d in done_lines] == [12]  # the batch finished once
