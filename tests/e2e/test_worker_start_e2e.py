"""How workers start: a worker that cannot load its model takes nothing and
exits 2, two workers for one task on one host get distinct names, and a run
that nobody serves says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from tests.hubcache import add_to_hub_cache
from tests.support import (
    REPO,
    WorkerProcess,
    conversations,
    run_fleet,
    status_counts,
    tasks_toml,
    write_jsonl,
)

pytestmark = pytest.mark.e2e


def _missing_model_env(fleet) -> dict[str, str]:
    config = tasks_toml(
        fleet.tmp / "missing.toml",
        [{"name": "not-prepared", "path": "not-prepared", "max_length": 128}],
    )
    return {**fleet.env, "FLEET_CONFIG_FILE": str(config)}


def test_worker_without_its_model_exits_2_before_consuming_anything(fleet):
    env = _missing_model_env(fleet)
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(20))
    run_fleet(["ingest", "conversations", str(path)], env)
    run_fleet(["enqueue", "--task", "intent", "--batch-size", "10"], env)
    broker = redis.Redis.from_url(fleet.broker_url)
    assert broker.llen("fleet.intent") == 2
    log = fleet.tmp / "missing.log"
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--task", "intent"],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    text = log.read_text()
    assert proc.returncode == 2, text
    assert "fleet models prepare" in text and "takes no batches" in text
    assert " ready." not in text
    # Nothing consumed: both messages wait for a worker that can run them.
    assert broker.llen("fleet.intent") == 2
    assert status_counts(fleet.db_url, "intent") == {"queued": 20}


def test_supervisor_does_not_restart_a_worker_without_its_model(fleet):
    env = _missing_model_env(fleet)
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "workers", "--task", "intent", "--gpus", "0,1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count("not restarting") == 2, proc.stdout
    assert proc.stdout.count("started intent@gpu") == 2  # each started once, never again


def _damaged_cache_env(fleet, tiny_models, damage: str) -> tuple[dict[str, str], str]:
    """A real hub cache holding tiny-big as acme/tiny-intent, damaged as a broken
    download leaves it: "no-weights" (config and tokenizer only), "truncated"
    (the weights blob cut short) or "dangling" (the weights link's blob gone)."""
    hub = fleet.tmp / "hf" / "hub"
    snapshot = add_to_hub_cache(hub, "acme/tiny-intent", tiny_models / "tiny-big", commit="c" * 40)
    weights = snapshot / "model.safetensors"
    blob = weights.resolve()
    if damage == "no-weights":
        weights.unlink()
    elif damage == "truncated":
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    else:
        blob.unlink()
    config = tasks_toml(
        fleet.tmp / "hub.toml",
        [{"name": "tiny-intent", "path": "acme/tiny-intent", "max_length": 128}],
    )
    env = {**fleet.env, "FLEET_CONFIG_FILE": str(config), "HF_HOME": str(fleet.tmp / "hf")}
    env.pop("HF_HUB_CACHE", None)
    return env, str(snapshot)


@pytest.mark.parametrize("damage", ["no-weights", "truncated", "dangling"])
def test_an_incomplete_hub_cache_exits_2_naming_the_snapshot(fleet, tiny_models, damage):
    env, snapshot = _damaged_cache_env(fleet, tiny_models, damage)
    log = fleet.tmp / "incomplete.log"
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--task", "intent"],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    text = log.read_text()
    assert proc.returncode == 2, text
    assert snapshot in text and "fleet models pull" in text and "takes no batches" in text
    assert "Traceback" not in text


def test_supervisor_does_not_restart_a_worker_with_truncated_weights(fleet, tiny_models):
    env, _ = _damaged_cache_env(fleet, tiny_models, "truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "workers", "--task", "intent", "--gpus", "0"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count("not restarting") == 1, proc.stdout
    assert proc.stdout.count("started intent@gpu") == 1, proc.stdout


def test_local_workers_do_not_restart_a_worker_with_no_weights(fleet, tiny_models):
    env, snapshot = _damaged_cache_env(fleet, tiny_models, "no-weights")
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(10))
    run_fleet(["ingest", "conversations", str(path)], env)
    proc = run_fleet(
        ["run", "--task", "intent", "--local-workers", "--timeout", "120"],
        env,
        check=False,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("not restarting it") == 1, out
    log = (fleet.tmp / "state" / "logs" / "intent-cpu.log").read_text()
    assert snapshot in log and "fleet models pull" in log
    assert status_counts(fleet.db_url, "intent") == {"pending": 10}


def test_two_workers_for_one_task_on_one_host_have_distinct_names(fleet):
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(200))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    workers = []
    for n in range(2):  # named by default, as `fleet worker --task intent` twice would be
        w = WorkerProcess("intent", fleet.env, fleet.tmp / f"default{n}.log")
        fleet.workers.append(w)
        workers.append(w.start())
    for w in workers:
        w.wait_ready()
    out = run_fleet(["run", "--task", "intent", "--timeout", "240", "--json"], fleet.env)
    assert "no live worker" not in out.stderr
    assert status_counts(fleet.db_url, "intent") == {"done": 200}
    deadline = time.monotonic() + 30
    names: list[str] = []
    while time.monotonic() < deadline:
        status = run_fleet(["status", "--json"], fleet.env).stdout
        names = [w["worker"] for w in json.loads(status)["workers"]]
        if len(names) == 2:
            break
        time.sleep(1)
    assert len(set(names)) == 2, names
    assert all(n.startswith("intent@cpu-") for n in names), names


def test_run_that_no_worker_serves_says_so_and_keeps_waiting(fleet):
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(10))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    started = time.monotonic()
    out = run_fleet(["run", "--task", "intent", "--timeout", "12"], fleet.env, check=False)
    assert out.returncode == 4, out.stdout + out.stderr  # timed out, after waiting
    assert time.monotonic() - started >= 12
    assert "no live worker serves task 'intent'" in out.stderr, out.stderr
    assert "fleet worker --task intent" in out.stderr
