"""Label maps shipped with a model, through real workers: a classifier whose
config.json has only LABEL_0... names and a label_map.json beside its weights
writes the map's names as results; a ladder with a model whose labels are not
the task's (even on its lowest tier) makes the worker refuse to start (exit 2)
before it consumes anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from fleet.models.finetune import INTENT_LABELS
from tests.support import REPO, build_tiny_classifier, conversations, run_fleet, write_jsonl

pytestmark = pytest.mark.e2e


def _config(path: Path, tiers: list[Path]) -> Path:
    lines = ["[tasks.intent]", 'kind = "sequence_classify"', 'source = "conversation"']
    lines.append("labels = " + json.dumps(dict.fromkeys(INTENT_LABELS, "")).replace(":", "="))
    for tier in tiers:
        lines += ["[[tasks.intent.ladder]]", f'name = "{tier.name}"', f'path = "{tier}"']
        lines.append("max_length = 128")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def mapped(tmp_path: Path) -> Path:
    """Generic names in config.json, the real ones in label_map.json (not in id order)."""
    folder = build_tiny_classifier(
        tmp_path / "generic", labels=[f"LABEL_{i}" for i in range(len(INTENT_LABELS))]
    )
    (folder / "label_map.json").write_text(
        json.dumps(
            {"label_to_id": {name: i for i, name in reversed(list(enumerate(INTENT_LABELS)))}}
        )
    )
    return folder


def test_shipped_label_map_names_the_results(fleet, mapped: Path) -> None:
    config = _config(fleet.tmp / "mapped.toml", [mapped])
    env = {**fleet.env, "FLEET_CONFIG_FILE": str(config)}
    fleet.env = env
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(12))
    run_fleet(["ingest", "conversations", str(path)], env)
    fleet.worker("intent")
    run_fleet(["run", "-t", "intent", "--timeout", "120"], env)
    out = run_fleet(["export", "-t", "intent", "--format", "jsonl"], env)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 12
    assert {r["label"] for r in rows} <= set(INTENT_LABELS), rows[0]
    assert all(set(r["scores"]) <= set(INTENT_LABELS) for r in rows)


def test_worker_refuses_a_model_with_other_labels(fleet, mapped: Path) -> None:
    other = build_tiny_classifier(
        fleet.tmp / "sentiment", labels=["negative", "neutral", "positive"]
    )
    config = _config(fleet.tmp / "wrong.toml", [mapped, other])
    env = {**fleet.env, "FLEET_CONFIG_FILE": str(config)}
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(10))
    run_fleet(["ingest", "conversations", str(path)], env)
    run_fleet(["enqueue", "--task", "intent", "--batch-size", "10"], env)
    log = fleet.tmp / "wrong.log"
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
    assert "tier sentiment" in text and "the model's labels are not the task's" in text
    assert "takes no batches" in text and " ready." not in text
    assert redis.Redis.from_url(fleet.broker_url).llen("fleet.intent") == 1
