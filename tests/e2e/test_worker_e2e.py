"""A real `celery worker` subprocess, fed by the CLI, writing to the real Postgres."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import (
    REPO,
    conversations,
    result_count_per_item,
    run_fleet,
    status_counts,
    write_jsonl,
)

pytestmark = pytest.mark.e2e

N = 500


def _wait_done(url: str, n: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c = status_counts(url, "intent")
        if c.get("done", 0) + c.get("failed", 0) + c.get("dead", 0) >= n:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not finished after {timeout}s: {status_counts(url, 'intent')}")


def _assert_exactly_one_result_each(url: str, n: int) -> None:
    assert status_counts(url, "intent") == {"done": n}
    per_item = result_count_per_item(url, "intent")
    assert len(per_item) == n and set(per_item.values()) == {1}


def test_500_conversations_through_a_real_worker(fleet, capsys):
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    worker = fleet.worker()
    worker.wait_ready()
    out = run_fleet(["enqueue", "--task", "intent"], fleet.env)
    assert f"sent {N} items" in out.stdout
    seconds = _wait_done(fleet.db_url, N, timeout=300)
    _assert_exactly_one_result_each(fleet.db_url, N)
    with capsys.disabled():
        print(
            f"\n[e2e] {N} items in {seconds:.1f}s = {N / seconds:.0f} items/s (1 CPU worker, tiny BERT)"
        )
    results = run_fleet(["results", "-t", "intent", "--json", "--limit", "5"], fleet.env)
    assert '"model_name": "tiny-big"' in results.stdout and '"model_tier": 0' in results.stdout
    log = worker.log.read_text()
    assert '"event": "batch"' in log and "tier" in log


def test_worker_killed_mid_run_loses_nothing(fleet):
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    # `fleet run` feeds the queue under backpressure and reconciles expired leases.
    runner = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "run", "-t", "intent", "--timeout", "240", "--json"],
        env=fleet.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = fleet.worker()
        deadline = time.monotonic() + 120
        while status_counts(fleet.db_url, "intent").get("done", 0) < 100:
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.05)
        first.kill()  # SIGKILL mid-batch: no cleanup, no ack
        killed_at = status_counts(fleet.db_url, "intent")
        assert killed_at.get("done", 0) < N
        fleet.worker().wait_ready()
        out, err = runner.communicate(timeout=260)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    _assert_exactly_one_result_each(fleet.db_url, N)
