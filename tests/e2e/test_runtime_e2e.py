"""The worker runtime's failure paths, through real worker processes on CPU.

Out-of-memory is produced by the memory-budget simulator (FLEET_SIMULATE_MEMORY),
which raises torch's real OutOfMemoryError inside the real worker; a poison
item kills the worker process (FLEET_CRASH_ON) the way a crashing kernel would.
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
from tests.support import (
    REPO,
    conversations,
    result_count_per_item,
    run_fleet,
    status_counts,
    write_jsonl,
)

pytestmark = pytest.mark.e2e


def _ingest(fleet, n: int) -> None:
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(n))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)


def _run(
    fleet, *, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "run",
            "-t",
            "intent",
            "--timeout",
            str(timeout),
            "--json",
        ],
        env={**fleet.env, **(env or {})},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _supervisor(fleet, gpus: str, logs, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`fleet workers` (the supervisor) pinning one worker per listed GPU index."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "workers",
            "-t",
            "intent",
            "--gpus",
            gpus,
            "--log-dir",
            str(logs),
        ],
        env={**fleet.env, **(env or {})},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _tiers(url: str) -> dict[int, int]:
    with transaction(url) as s:
        return dict(
            s.execute(text("SELECT r.model_tier, count(*) FROM results r GROUP BY 1")).all()
        )


def _one_result_each(url: str, n: int) -> None:
    per_item = result_count_per_item(url, "intent")
    assert len(per_item) == n and set(per_item.values()) == {1}


def test_simulated_oom_completes_at_a_smaller_budget(fleet):
    _ingest(fleet, 200)
    w = fleet.worker(FLEET_SIMULATE_MEMORY="0:600")  # tier 0 budget 4096 -> OOM until <= 600
    run = _run(fleet)
    out, err = run.communicate(timeout=200)
    assert run.returncode == 0, err
    assert status_counts(fleet.db_url, "intent") == {"done": 200}
    assert _tiers(fleet.db_url) == {0: 200}
    log = w.log.read_text()
    assert "OOM task=intent tier=0" in log and "retry_smaller" in log
    assert '"ooms": 0' in log  # later batches start on the remembered, smaller budget
    _one_result_each(fleet.db_url, 200)


def test_oom_at_every_budget_steps_down_to_tier_1(fleet):
    _ingest(fleet, 150)
    w = fleet.worker(FLEET_SIMULATE_MEMORY="0:0")
    run = _run(fleet)
    out, err = run.communicate(timeout=200)
    assert run.returncode == 0, err
    assert status_counts(fleet.db_url, "intent") == {"done": 150}
    assert _tiers(fleet.db_url) == {1: 150}
    with transaction(fleet.db_url) as s:
        assert s.execute(text("SELECT DISTINCT model_name FROM results")).scalars().all() == [
            "tiny-small"
        ]
    assert "-> downshift" in w.log.read_text()


def test_poison_item_ends_dead_and_its_batch_completes(fleet):
    _ingest(fleet, 40)
    env = {
        "FLEET_CRASH_ON": "c000013",
        "FLEET_BATCH_SIZE": "8",
        "FLEET_LEASE_SECONDS": "5",
        "FLEET_RESTART_BACKOFF": "0.2",
    }
    sup = _supervisor(fleet, "0", fleet.tmp / "logs", env)
    try:
        run = _run(fleet, timeout=240, env=env)
        out, err = run.communicate(timeout=260)
    finally:
        sup.send_signal(signal.SIGTERM)
        sup_out = sup.communicate(timeout=60)[0]
    assert run.returncode == 1, err  # exit 1: an item ended dead
    counts = status_counts(fleet.db_url, "intent")
    assert counts == {"done": 39, "dead": 1}, (counts, sup_out)
    with transaction(fleet.db_url) as s:
        ext, reason = s.execute(
            text(
                "SELECT c.external_id, w.last_error FROM work_items w JOIN conversations c ON c.id = w.source_id "
                "WHERE w.status = 'dead'"
            )
        ).one()
    assert ext == "c000013" and "isolated as poison" in reason
    assert "exited with 137" in sup_out and "restarting" in sup_out
    per_item = result_count_per_item(fleet.db_url, "intent")
    assert sum(per_item.values()) == 39


def test_redis_flushed_mid_run_the_reconciler_finishes_everything(fleet):
    _ingest(fleet, 400)
    fleet.worker(FLEET_SIMULATE_MEMORY="0:2000")
    run = _run(fleet, timeout=240)
    deadline = time.monotonic() + 120
    while status_counts(fleet.db_url, "intent").get("done", 0) < 60:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    redis.Redis.from_url(fleet.broker_url).flushdb()  # every queued message and binding gone
    out, err = run.communicate(timeout=260)
    assert run.returncode == 0, err
    assert status_counts(fleet.db_url, "intent") == {"done": 400}
    _one_result_each(fleet.db_url, 400)


def test_two_pinned_workers_share_one_queue(fleet):
    _ingest(fleet, 600)
    logs = fleet.tmp / "logs"
    sup = _supervisor(fleet, "0,1", logs)
    try:
        deadline = time.monotonic() + 120
        while sum(" ready." in p.read_text() for p in logs.glob("*.log")) < 2:
            assert time.monotonic() < deadline, "workers not ready"
            time.sleep(0.2)
        run = _run(fleet, env={"FLEET_BATCH_SIZE": "8"})
        out, err = run.communicate(timeout=200)
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.communicate(timeout=60)
    assert run.returncode == 0, err
    assert status_counts(fleet.db_url, "intent") == {"done": 600}
    _one_result_each(fleet.db_url, 600)
    with transaction(fleet.db_url) as s:
        workers = dict(s.execute(text("SELECT worker, count(*) FROM work_items GROUP BY 1")).all())
    assert {w.split("-")[0] for w in workers} == {"intent@gpu0", "intent@gpu1"}
    assert len(workers) == 2  # unique names: one per pinned worker
    assert min(workers.values()) > 50  # both really worked
    for gpu in (0, 1):  # each pinned worker logged under its own name
        log = (logs / f"intent-gpu{gpu}.log").read_text()
        assert f"intent@gpu{gpu}-" in log and " ready." in log
