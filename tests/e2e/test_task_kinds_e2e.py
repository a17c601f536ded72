"""Every text task kind end to end with the real bundled models, through real
workers on the real services: the fine-tuned MiniLM intent classifier, zero-shot
by MiniLM embedding similarity, and SmolLM2 classifying into JSON. Malformed
conversations fail with their reasons while the rest of their batch completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import text

from db.engine import transaction
from fleet.models.finetune import INTENT_LABELS
from fleet.models.prepare import prepare_minilm
from tests.support import REPO, WorkerProcess, fleet_env, run_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABELS = set(INTENT_LABELS)
BAD = [
    ({"external_id": "bad-empty", "messages": []}, "conversation has no messages"),
    ({"external_id": "bad-role", "messages": [{"content": "hi"}]}, "has no role"),
    (
        {"external_id": "bad-type", "messages": [{"role": "user", "content": 42}]},
        "content must be a string",
    ),
    (
        {"external_id": "bad-huge", "messages": [{"role": "user", "content": "a" * 5_000_000}]},
        "exceeds 1,000,000 characters",
    ),
    ({"external_id": "bad-shape", "messages": "not a list"}, "must be a list"),
]


@pytest.fixture
def kinds_fleet(db_url, broker_url, bundled_models_dir, trained_intent, smollm_dir, tmp_path):
    prepare_minilm(bundled_models_dir)
    samples = [
        json.loads(line)
        for line in (REPO / "config/data/sample_conversations.jsonl").read_text().splitlines()
        if line.strip()
    ]
    per_label: dict[str, int] = {}
    chosen = []
    for s in samples:  # 2 per label keeps the LLM part short on a CPU
        lab = s["meta"]["gold_intent"]
        if per_label.get(lab, 0) < 2:
            per_label[lab] = per_label.get(lab, 0) + 1
            chosen.append(s)
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen + [b for b, _ in BAD]))
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(bundled_models_dir),
            "FLEET_BATCH_SIZE": "8",
        }
    )
    run_fleet(["ingest", "conversations", str(path)], env)
    workers = [
        WorkerProcess(t, env, tmp_path / f"{t}.log").start()
        for t in ("intent", "topic", "llm_classify")
    ]
    yield env, db_url, chosen
    for w in workers:
        w.stop()


def _rows(url: str, task: str) -> dict[str, tuple]:
    with transaction(url) as s:
        rows = s.execute(
            text("""
            SELECT c.external_id, w.status, w.last_error, r.label, r.confidence, r.output, r.model_name
            FROM work_items w JOIN conversations c ON c.id = w.source_id
            LEFT JOIN results r ON r.work_item_id = w.id WHERE w.task = :t"""),
            {"t": task},
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.mark.timeout(1800)  # the first test to need the trained intent model trains it
def test_every_text_task_kind(kinds_fleet):
    env, url, chosen = kinds_fleet
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "run",
            "-t",
            "intent",
            "-t",
            "topic",
            "-t",
            "llm_classify",
            "--timeout",
            "900",
            "--json",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=960,
    )
    assert run.returncode == 1, run.stderr  # the malformed conversations fail, by design
    gold = {c["external_id"]: c["meta"]["gold_intent"] for c in chosen}

    for task in ("intent", "topic", "llm_classify"):
        rows = _rows(url, task)
        for bad, reason in BAD:
            status, err, *_ = rows[bad["external_id"]]
            assert status == "failed" and reason in err, (task, bad["external_id"], err)
        for eid in gold:
            status, err, label, conf, output, model = rows[eid]
            if task == "llm_classify" and status == "failed":
                # an explicit invalid_output, raw text kept: never a silent default
                assert (
                    err.startswith("LLM output was not valid JSON")
                    and output["status"] == "invalid_output"
                )
                assert output["raw"]
                continue
            assert status == "done", (task, eid, err)
            assert label in LABELS and 0 <= conf <= 1

    intent = _rows(url, "intent")
    correct = sum(intent[e][2] == g for e, g in gold.items())
    assert correct / len(gold) >= 0.85, {e: (intent[e][2], g) for e, g in gold.items()}
    assert {intent[e][5] for e in gold} == {"minilm-intent"}
    topic = _rows(url, "topic")
    assert all(topic[e][4]["method"] == "embedding" for e in gold)
    llm = _rows(url, "llm_classify")
    valid = [e for e in gold if llm[e][0] == "done"]
    assert len(valid) >= len(gold) // 2  # constrained category + one repair: most parse
    for e in valid:
        out = llm[e][4]
        assert out["category"] == llm[e][2] and "reasoning" in out and "key_entities" in out
