"""`fleet calibrate --gold --target-escalation` against stored results on the real Postgres."""

from __future__ import annotations

import json

from click.testing import CliRunner
from sqlalchemy import text

from db import ledger
from db.engine import transaction
from db.sources import ingest_conversations
from fleet.cli import main
from tests.support import conversations, write_jsonl

# c000000..c000009 answered "a" at confidence 0.05 .. 0.95; gold says the two least
# confident and c000005 are "b".
CONFIDENCE = {f"c{i:06d}": 0.05 + 0.1 * i for i in range(10)}
GOLD = {eid: ("b" if eid in {"c000000", "c000001", "c000005"} else "a") for eid in CONFIDENCE}


def _store(url: str) -> None:
    with transaction(url) as s:
        ingest_conversations(s, conversations(10))
        ledger.discover(s, task="intent", source_kind="conversation")
    with transaction(url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=10, batch_size=10, lease_seconds=60)
    with transaction(url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        ext: dict[int, str] = dict(
            s.execute(
                text(
                    "SELECT w.id, c.external_id FROM work_items w JOIN conversations c ON c.id = w.source_id"
                )
            ).all()
        )
        outcomes = [
            ledger.Outcome(
                i,
                {
                    "label": "a",
                    "confidence": CONFIDENCE[ext[i]],
                    "scores": None,
                    "output": None,
                    "model_name": "m",
                    "model_tier": 0,
                    "device": "cpu",
                    "latency_ms": 1.0,
                },
            )
            for i in batch.item_ids
        ]
        ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)


def test_target_escalation_picks_the_threshold(db_url, broker_url, tmp_path):
    _store(db_url)
    gold = write_jsonl(
        tmp_path / "gold.jsonl", [{"external_id": e, "label": g} for e, g in GOLD.items()]
    )
    env = {"DATABASE_URL": db_url, "BROKER_URL": broker_url, "FLEET_STATE_DIR": str(tmp_path / "s")}
    args = ["calibrate", "-t", "intent", "--gold", str(gold), "--target-escalation", "0.2"]
    res = CliRunner().invoke(main, [*args, "--json"], env=env)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert 0.15 < got["escalate_below"] < 0.25  # between the 2nd and 3rd lowest confidence
    assert (got["n"], got["escalated"], got["errors"], got["errors_caught"]) == (10, 2, 3, 2)
    human = CliRunner().invoke(main, args, env=env)
    assert "sends 2 of 10 (20.0%)" in human.output and "2 of 3 errors" in human.output
    assert "escalate_below = 0.2000" in human.output

    both = CliRunner().invoke(main, ["calibrate", "-t", "intent", "--gold", str(gold)], env=env)
    assert both.exit_code == 2 and "--target-escalation" in both.output


def test_topic_scaling_is_fitted_with_a_bias_per_label(tmp_path, bundled_models_dir):
    """`fleet calibrate --task topic --data` fits a temperature and a bias per label on the
    real MiniLM and prints option lines that parse and that the adapter accepts."""
    import tomllib

    from config.data import data_path as data_file
    from config.taskconfig import load_tasks
    from fleet.models.prepare import prepare_minilm
    from workers.adapters.zero_shot import ZeroShotAdapter

    prepare_minilm(bundled_models_dir)
    env = {"FLEET_MODELS_DIR": str(bundled_models_dir), "FLEET_STATE_DIR": str(tmp_path / "s")}
    args = ["calibrate", "-t", "topic", "--data", str(data_file("intent.jsonl"))]
    res = CliRunner().invoke(main, [*args, "--per-label", "3", "--json"], env=env)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    labels = list(load_tasks()["topic"].labels)
    assert got["n"] == 3 * len(labels) and got["temperature"] > 0
    assert list(got["label_bias"]) == labels
    assert abs(sum(got["label_bias"].values())) < 1e-3  # centred
    options = tomllib.loads(got["where"].split("\n", 1)[1])
    assert set(options) == {"temperature", "label_bias"}
    ZeroShotAdapter(labels=load_tasks()["topic"].labels, **options)
