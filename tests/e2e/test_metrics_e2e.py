"""A real worker processes a few hundred items; `fleet watch --until-done`,
`fleet status --json` and `fleet metrics` (scraped over HTTP) are checked
against the ledger, the worker's log and its stats in Redis.

The worker starts with a memory simulator that gives the top tier no room, so
it steps down the ladder on its first batch: the OOM, downshift and tier
metrics then have something real to count."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.integration.test_status import Exporter, dashboard_metrics, value
from tests.support import REPO, conversations, run_fleet, status_counts, write_jsonl
from wire.stats import redis_client, scan_workers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 320  # 10 batches of 32


def _wait_for_stats(broker_url: str, batches: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        workers = scan_workers(redis_client(broker_url))
        if workers and workers[0].batches >= batches:
            return workers
        assert time.monotonic() < deadline, f"worker stats never reached {batches}: {workers}"
        time.sleep(0.2)


def test_metrics_and_status_match_the_ledger_and_the_worker(fleet):
    run_fleet(
        ["ingest", "conversations", str(write_jsonl(fleet.tmp / "c.jsonl", conversations(N)))],
        fleet.env,
    )
    # Leases outlast any queue wait here, so no batch is reclaimed and re-cut; messages
    # keep FLEET_BATCH_SIZE (not sized by throughput), so the run is N / 32 batches.
    fleet.env["FLEET_LEASE_SECONDS"] = "300"
    fleet.env["FLEET_BATCH_SECONDS"] = "0"
    worker = fleet.worker(FLEET_SIMULATE_MEMORY="0:0")  # tier 0 always OOMs; tier 1 unlimited
    worker.wait_ready()
    [w] = _wait_for_stats(fleet.broker_url, 0)
    assert (w.tier, w.model, w.batches, w.gpu) == (0, "tiny-big", 0, "cpu")

    # Every item becomes a work item now (one batch sent), so `watch` has work to wait
    # for from its start; `fleet run` feeds the rest and records a run.
    run_fleet(["enqueue", "--task", "intent", "--limit", "32"], fleet.env)
    runner = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "run", "--task", "intent", "--timeout", "240"],
        env=fleet.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "watch", "--until-done", "--interval", "0.5"]
        + ["--task", "intent", "--timeout", "240"],
        env=fleet.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = watch.communicate(timeout=300)
    # It exits 0 only once nothing is left to do, and by then everything is done.
    assert watch.returncode == 0, err
    assert status_counts(fleet.db_url, "intent") == {"done": N}
    assert f"{N}/{N}" in out
    _, run_err = runner.communicate(timeout=120)
    assert runner.returncode == 0, run_err

    with transaction(fleet.db_url) as s:
        batches = s.execute(
            text("SELECT count(DISTINCT batch_id) FROM work_items WHERE task = 'intent'")
        ).scalar_one()
        tiers = s.execute(text("SELECT DISTINCT model_tier FROM results")).scalars().all()
    assert batches == N // 32 and tiers == [1]
    [w] = _wait_for_stats(fleet.broker_url, batches)
    log = worker.log.read_text()
    ooms_logged = len(re.findall(r"OOM task=intent", log))
    assert log.count('"event": "batch"') == batches
    assert (w.tier, w.model, w.downshifts, w.ooms) == (1, "tiny-small", 1, ooms_logged)

    status = json.loads(run_fleet(["status", "--json"], fleet.env).stdout)
    intent = status["tasks"]["intent"]
    assert intent["counts"]["done"] == N and intent["remaining"] == 0
    assert intent["queue_length"] == 0 and intent["eta_seconds"] == 0
    assert intent["items_per_second"] > 0
    [sw] = status["workers"]
    assert (sw["worker"], sw["tier"], sw["batches"], sw["items_done"]) == (w.worker, 1, 10, N)

    exporter = Exporter(fleet.env)
    try:
        got = exporter.scrape()
    finally:
        rc, err = exporter.stop()
    assert rc == 0, err
    me = {"worker": w.worker, "task": "intent"}
    assert value(got, "fleet_exporter_up", source="database") == 1
    assert value(got, "fleet_exporter_up", source="broker") == 1
    assert value(got, "fleet_backlog_items", task="intent", status="done") == N
    assert value(got, "fleet_backlog_items", task="intent", status="pending") == 0
    assert value(got, "fleet_queue_length", task="intent", queue="fleet.intent") == 0
    assert value(got, "fleet_remaining_items", task="intent") == 0
    assert value(got, "fleet_workers", task="intent") == 1
    assert value(got, "fleet_items_per_second", task="intent") > 0
    assert value(got, "fleet_worker_tier", **me) == 1
    info = {"model": "tiny-small", "gpu": "cpu", "device": "cpu", "device_name": "cpu"}
    assert value(got, "fleet_worker_info", **me, **info) == 1
    assert value(got, "fleet_worker_items_total", **me, outcome="done") == N
    assert value(got, "fleet_worker_items_total", **me, outcome="failed") == 0
    assert value(got, "fleet_worker_messages_total", **me, outcome="processed") == batches
    assert value(got, "fleet_worker_downshifts_total", **me) == 1
    assert value(got, "fleet_worker_ooms_total", **me) == ooms_logged
    assert value(got, "fleet_worker_gpu_memory_allocated_bytes", **me) == 0
    assert value(got, "fleet_worker_batch_seconds_count", **me) == batches
    assert value(got, "fleet_worker_batch_seconds_bucket", **me, le="+Inf") == batches
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in got.items()
        if name == "fleet_worker_batch_seconds_bucket"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert 0 < value(got, "fleet_worker_batch_seconds_sum", **me) < 300

    assert value(got, "fleet_last_run_finished_timestamp_seconds", trigger="manual") > 0

    # Every metric the Grafana dashboard queries is one this exporter exposes.
    missing = dashboard_metrics() - {name for name, _ in got}
    assert not missing, f"the dashboard queries metrics the exporter does not expose: {missing}"

    # A worker that stops (warm shutdown) removes its stats at once, not after the TTL.
    worker.stop()
    assert scan_workers(redis_client(fleet.broker_url)) == []
