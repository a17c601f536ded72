"""Items that kill their worker every time (FLEET_CRASH_ON, like a segfaulting
kernel) under two supervised workers: each ends dead with its reason, every
other item is done, and the number of worker deaths stays within the bound
poison isolation promises (FLEET_POISON_CRASHES + 1 each, whatever the batch
size), with no redelivery once they are dead.

The single-item, single-worker version is tests/e2e/test_runtime_e2e.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import text

from db.engine import transaction
from tests.chaos.conftest import make_fleet
from tests.support import (
    REPO,
    conversations,
    result_count_per_item,
    run_fleet,
    status_counts,
    write_jsonl,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

N = 200
BATCH = 16
POISON = ("c000013", "c000101")
CRASHES = 2  # FLEET_POISON_CRASHES


def test_two_poison_items_end_dead_within_the_death_bound(
    db_url, broker_url, tiny_models, tmp_path
):
    env = {
        "FLEET_CRASH_ON": ",".join(POISON),
        "FLEET_BATCH_SIZE": str(BATCH),
        "FLEET_LEASE_SECONDS": "5",
        "FLEET_POISON_CRASHES": str(CRASHES),
        "FLEET_RESTART_BACKOFF": "0.2",
    }
    fleet = make_fleet(db_url, broker_url, tiny_models, tmp_path, **env)
    path = write_jsonl(tmp_path / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    sup_log = tmp_path / "supervisor.out"
    sup = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "workers",
            "-t",
            "intent",
            "--gpus",
            "0,1",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        env=fleet.env,
        cwd=REPO,
        stdout=sup_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        run = fleet.run(timeout=300)
        code, out, err = fleet.wait_run(run, timeout=320)
        deaths_at_end = sup_log.read_text().count("exited with 137")
        # Dead is final: nothing is sent again, no worker dies any more.
        time.sleep(8)
        assert sup_log.read_text().count("exited with 137") == deaths_at_end
        assert redis.Redis.from_url(broker_url).llen("fleet.intent") == 0
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=120)
        fleet.close()
    supervisor = sup_log.read_text()
    assert code == 1, f"expected exit 1 (items dead)\n{out}\n{err[-3000:]}"  # 1: items ended dead
    assert status_counts(db_url, "intent") == {"done": N - len(POISON), "dead": len(POISON)}
    with transaction(db_url) as s:
        dead = dict(
            s.execute(
                text(
                    "SELECT c.external_id, w.last_error FROM work_items w "
                    "JOIN conversations c ON c.id = w.source_id WHERE w.status = 'dead'"
                )
            ).all()
        )
    assert set(dead) == set(POISON)
    for reason in dead.values():
        assert "isolated as poison" in reason and "fleet retry --status dead" in reason, reason
    per_item = result_count_per_item(db_url, "intent")
    assert sum(per_item.values()) == N - len(POISON) and max(per_item.values()) == 1
    # One death with its batch, then CRASHES alone, for each poison item.
    bound = len(POISON) * (CRASHES + 1)
    assert len(POISON) * CRASHES <= deaths_at_end <= bound, supervisor
    print(
        f"\n[chaos] {len(POISON)} poison items isolated after {deaths_at_end} worker deaths (bound {bound})"
    )
