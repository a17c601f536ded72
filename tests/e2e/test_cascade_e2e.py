"""A cascade through real workers: the cheap task answers every item, items under its
threshold get one item on the stronger task, whose answer becomes the final label in
fleet_latest_results; a stronger tier that fails keeps the first label with a note; a
worker killed mid-cascade neither loses nor doubles an escalation."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.support import conversations, result_count_per_item, run_fleet, write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

THRESHOLD = 0.75  # the fake model's confidence is uniform in [0.5, 1): about half escalate
N = 40
NO_GOLD = {"c000003", "c000011", "c000017", "c000029"}  # the oracle fails these


def _env(fleet, *, cheap_seconds: float = 0.0, oracle_seconds: float = 0.0) -> dict[str, str]:
    gold = write_jsonl(
        fleet.tmp / "gold.jsonl",
        [
            {"external_id": c["external_id"], "label": "gold"}
            for c in conversations(N)
            if c["external_id"] not in NO_GOLD
        ],
    )
    config = fleet.tmp / "cascade.toml"
    config.write_text(
        "include_bundled = false\n"
        "[tasks.cheap]\n"
        'kind = "fake"\n'
        'source = "conversation"\n'
        'escalate_to = "oracle"\n'
        f"escalate_below = {THRESHOLD}\n"
        f"seconds_per_item = {cheap_seconds}\n"
        '[[tasks.cheap.ladder]]\nname = "fake-cheap"\npath = "tiny-big"\n'
        "[tasks.oracle]\n"
        'kind = "fake"\n'
        'source = "conversation"\n'
        f"gold = {json.dumps(str(gold))}\n"
        "cost_per_item = 0.25\n"
        f"seconds_per_item = {oracle_seconds}\n"
        '[[tasks.oracle.ladder]]\nname = "oracle"\npath = "tiny-big"\n'
    )
    return {**fleet.env, "FLEET_CONFIG_FILE": str(config), "FLEET_BATCH_SIZE": "8"}


def _view(url: str) -> dict[str, dict]:
    with transaction(url) as s:
        rows = s.execute(text("SELECT * FROM fleet_latest_results WHERE task = 'cheap'")).all()
    return {r.external_id: dict(r._mapping) for r in rows}


def _cheap_results(url: str) -> dict[str, tuple[str, float, dict]]:
    with transaction(url) as s:
        rows = s.execute(
            text(
                "SELECT c.external_id, r.label, r.confidence, r.output FROM work_items w "
                "JOIN results r ON r.work_item_id = w.id JOIN conversations c ON c.id = w.source_id "
                "WHERE w.task = 'cheap'"
            )
        ).all()
    return {r[0]: (r[1], r[2], r[3] or {}) for r in rows}


def _oracle_items(url: str) -> dict[str, str]:
    with transaction(url) as s:
        rows = s.execute(
            text(
                "SELECT c.external_id, w.status FROM work_items w "
                "JOIN conversations c ON c.id = w.source_id WHERE w.task = 'oracle'"
            )
        ).all()
    return {r[0]: r[1] for r in rows}


def _start(fleet, env: dict[str, str], task: str):
    return fleet.worker(task, **{k: v for k, v in env.items() if k.startswith("FLEET_")})


def test_escalated_not_escalated_and_a_failing_stronger_tier(fleet):
    env = _env(fleet)
    run_fleet(
        ["ingest", "conversations", str(write_jsonl(fleet.tmp / "c.jsonl", conversations(N)))], env
    )
    workers = [_start(fleet, env, "cheap"), _start(fleet, env, "oracle")]
    for w in workers:
        w.wait_ready()
    run_fleet(["run", "-t", "cheap", "-t", "oracle", "--timeout", "180"], env, check=False)

    cheap = _cheap_results(fleet.db_url)
    assert len(cheap) == N
    low = {e for e, (_, conf, _) in cheap.items() if conf < THRESHOLD}
    assert 0 < len(low) < N
    # Only the unsure items reached the stronger task: it was not discovered for the rest.
    oracle = _oracle_items(fleet.db_url)
    assert set(oracle) == low
    assert {e for e, s in oracle.items() if s == "failed"} == low & NO_GOLD
    view = _view(fleet.db_url)
    for eid, (label, conf, output) in cheap.items():
        row = view[eid]
        assert row["first_label"] == label
        if eid not in low:  # not escalated: the cheap answer is final
            assert "escalated_to" not in output
            assert (row["label"], row["decided_by"], row["escalated"]) == (label, "cheap", False)
            assert row["escalation_note"] is None and row["confidence"] == conf
        elif eid in NO_GOLD:  # the stronger tier failed: the first label stays, with why
            assert row["escalated"] is True and row["decided_by"] == "cheap"
            assert row["label"] == label
            assert "the stronger tier oracle failed" in row["escalation_note"]
            assert "no gold label" in row["escalation_note"]
        else:  # escalated: the stronger answer is final
            assert output["escalated_to"] == "oracle" and output["escalate_below"] == THRESHOLD
            assert (row["label"], row["decided_by"], row["escalated"]) == ("gold", "oracle", True)
            assert row["confidence"] == 1.0 and row["model"] == "oracle"
            assert row["escalation_note"] is None
    _check_share_and_cost(fleet, env, escalated=len(low), failed=len(low & NO_GOLD))


def _check_share_and_cost(fleet, env: dict[str, str], *, escalated: int, failed: int) -> None:
    """`fleet status`, metrics and the report show the cascade's share and cost."""
    from fleet.observe.prometheus import FleetCollector

    status = json.loads(run_fleet(["status", "--json"], env).stdout)["cascades"]
    c = status["cheap"]
    assert (c["escalate_to"], c["decided"], c["escalated"]) == ("oracle", N, escalated)
    assert c["share"] == round(escalated / N, 4)
    assert (c["answered"], c["waiting"], c["failed"]) == (escalated - failed, 0, failed)
    assert c["strong_model_seconds"] is not None and c["strong_model_seconds"] >= 0
    text_out = run_fleet(["status"], env).stdout
    assert f"cascade cheap -> oracle: {escalated} of {N} escalated" in text_out

    collector = FleetCollector(
        fleet.db_url,
        fleet.broker_url,
        tasks=["cheap", "oracle"],
        window=60.0,
        cascades={"cheap": "oracle"},
    )
    metrics = {
        (m.name, tuple(sorted(s.labels.items()))): s.value
        for m in collector.collect()
        for s in m.samples
    }
    key = (("escalate_to", "oracle"), ("task", "cheap"))
    assert metrics[("fleet_cascade_escalated_items", key)] == escalated
    assert metrics[("fleet_cascade_escalation_share", key)] == escalated / N
    failed_key = (("escalate_to", "oracle"), ("state", "failed"), ("task", "cheap"))
    assert metrics[("fleet_cascade_strong_items", failed_key)] == failed

    page = fleet.tmp / "report.html"
    run_fleet(["report", "--since", "2000-01-01", "-o", str(page)], env)
    html = page.read_text()
    assert (
        "<h2>Cascades</h2>" in html
        and '<tr data-task="cheap"><td>cheap</td><td>oracle</td>' in html
    )


def test_a_worker_killed_mid_cascade_loses_and_doubles_nothing(fleet):
    """Slow workers, each SIGKILLed once mid-batch and replaced: the lease returns their
    batches; every unsure item still has exactly one stronger item and one result each."""
    env = _env(fleet, cheap_seconds=0.15, oracle_seconds=0.3)
    env["FLEET_LEASE_SECONDS"] = "5"
    run_fleet(
        ["ingest", "conversations", str(write_jsonl(fleet.tmp / "c.jsonl", conversations(N)))], env
    )
    cheap, oracle = _start(fleet, env, "cheap"), _start(fleet, env, "oracle")
    cheap.wait_ready()
    oracle.wait_ready()
    import subprocess
    import sys

    from tests.support import REPO

    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "run",
            "-t",
            "cheap",
            "-t",
            "oracle",
            "--timeout",
            "240",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _oracle_items(fleet.db_url):
            time.sleep(0.2)
        assert _oracle_items(fleet.db_url), "no escalation before the kill"
        cheap.kill()  # mid-run: its in-flight batch is neither written nor lost
        time.sleep(1.0)
        oracle.kill()
        _start(fleet, env, "cheap").wait_ready()
        _start(fleet, env, "oracle").wait_ready()
        driver.wait(timeout=260)
    finally:
        if driver.poll() is None:
            driver.kill()
    results = _cheap_results(fleet.db_url)
    assert len(results) == N
    low = {e for e, (_, conf, _) in results.items() if conf < THRESHOLD}
    items = _oracle_items(fleet.db_url)
    assert set(items) == low  # one stronger item per unsure row, none for the rest
    assert set(result_count_per_item(fleet.db_url, "cheap").values()) == {1}
    per_oracle = result_count_per_item(fleet.db_url, "oracle")
    assert all(n <= 1 for n in per_oracle.values())
    assert sum(per_oracle.values()) == len(low - NO_GOLD)
