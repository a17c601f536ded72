"""Distillation through the real CLI: `fleet train --from-task llm_classify` learns from the
llm_classify results stored in a real Postgres (written through the ledger, as a worker
writes them), keeps only confident (or reviewer-confirmed) labels and weighs each by its
confidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.engine import transaction
from db.ledger import Outcome, claim_batches, discover, finish_batch, start_batch
from db.sources import ingest_conversations
from fleet.cli import main
from fleet.models.distill import distilled_examples
from fleet.models.finetune import INTENT_LABELS
from fleet.reporting.export import GoldLabels, load_gold
from tests.support import build_tiny_classifier

WORDS = {
    "rag_query": "search the wiki for",
    "professional": "my manager needs the slides on",
    "psychological": "why do I overthink",
    "learning": "explain for my exam",
    "social": "my sister and I fell out over",
    "emotional": "I'm so happy right now about",
    "aspirational": "my dream is to master",
    "chitchat": "lol tell me a joke about",
}
TOPICS = ("boats", "tea", "snow", "jazz", "glue")


def _store_llm_results(url: str, *, crm: bool = False) -> dict[str, tuple[str, float]]:
    """Conversations, llm_classify items and their results; returns external_id -> (label, conf).

    Per label: four confident results (0.9), one unsure (0.3); plus one failed item.
    With `crm`, the source 'crm' also holds `<label>-0` (its own conversation, the same
    label and confidence): ids are unique per source only."""
    records, truth = [], {}
    for lab, words in WORDS.items():
        for i, topic in enumerate(TOPICS):
            eid = f"{lab}-{i}"
            records.append(
                {"external_id": eid, "messages": [{"role": "user", "content": f"{words} {topic}"}]}
            )
            truth[eid] = (lab, 0.3 if i == 4 else 0.9)
    records.append({"external_id": "broken", "messages": [{"role": "user", "content": "x"}]})
    with transaction(url) as s:
        ingest_conversations(s, records)
        for lab in WORDS if crm else ():
            s.execute(
                text(
                    "INSERT INTO conversations (source, external_id, messages) "
                    "VALUES ('crm', :e, CAST(:m AS jsonb))"
                ),
                {
                    "e": f"{lab}-0",
                    "m": json.dumps([{"role": "user", "content": f"crm: {WORDS[lab]} kites"}]),
                },
            )
        discover(s, task="llm_classify", source_kind="conversation")
        [batch] = claim_batches(s, task="llm_classify", limit=100, batch_size=100, lease_seconds=60)
        started = start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        ext = dict(
            s.execute(
                text(
                    "SELECT w.id, c.external_id FROM work_items w "
                    "JOIN conversations c ON c.id = w.source_id"
                )
            ).all()
        )
        outcomes = []
        for item in started:
            eid = ext[item.item_id]
            if eid == "broken":
                outcomes.append(Outcome(item.item_id, None, "the model's answer was not JSON"))
                continue
            label, conf = truth[eid]
            result = {
                "label": label,
                "confidence": conf,
                "scores": {label: conf},
                "output": {"category": label},
                "model_name": "smollm2-135m-instruct",
                "model_tier": 0,
                "device": "cpu",
                "latency_ms": 12.0,
            }
            outcomes.append(Outcome(item.item_id, result))
        finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)
    return truth


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    return build_tiny_classifier(tmp_path / "tiny", labels=["x", "y"])


def _env(db_url: str, broker_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "FLEET_STATE_DIR": str(tmp_path / "state"),
        "FLEET_MODELS_DIR": str(tmp_path / "models"),
    }


def test_train_from_stored_llm_results(
    db_url: str, broker_url: str, tmp_path: Path, tiny_base: Path
) -> None:
    _store_llm_results(db_url)
    out = tmp_path / "distilled"
    result = CliRunner().invoke(
        main,
        ["train", "--task", "intent", "--from-task", "llm_classify", "--min-confidence", "0.6"]
        + ["--base", str(tiny_base), "--out", str(out), "--epochs", "2", "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["distilled"] == {
        "from_task": "llm_classify",
        "min_confidence": 0.6,
        "seen": 40,  # done items with a label; the failed one is not read
        "kept": 32,
        "below_min_confidence": 8,
        "not_confirmed": 0,
        "ambiguous": 0,
        "bad_text": 0,
        "per_label": {lab: 4 for lab in sorted(INTENT_LABELS)},
    }
    assert report["n_train"] + report["n_test"] == 32
    assert report["labels"] == list(INTENT_LABELS)
    assert report["data"] == "results of llm_classify (confidence >= 0.6)"
    assert (out / "model.safetensors").is_file()
    saved = json.loads((out / "training_metrics.json").read_text())
    assert saved["distilled"]["kept"] == 32 and "llm_classify" in (out / "README.md").read_text()

    # Old vs new on the same stored items: `fleet compare` runs both folders.
    other = build_tiny_classifier(tmp_path / "old", seed=7)
    compared = CliRunner().invoke(
        main,
        ["compare", "-t", "intent", "--models", str(other), str(out), "--limit", "20"]
        + ["-o", str(tmp_path / "side.jsonl"), "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert compared.exit_code == 0, compared.output
    side = [json.loads(line) for line in (tmp_path / "side.jsonl").read_text().splitlines()]
    assert json.loads(compared.stdout)["n"] == len(side) == 20
    assert {row["b"]["model"] for row in side} == {str(out)}
    assert all(row["b"]["label"] in INTENT_LABELS for row in side)


def test_only_reviewer_confirmed_labels(
    db_url: str, broker_url: str, tmp_path: Path, tiny_base: Path
) -> None:
    truth = _store_llm_results(db_url)
    # A reviewer confirmed two items per label and corrected one: that one is left out.
    reviewed = tmp_path / "reviewed.jsonl"
    lines = []
    for lab in WORDS:
        lines.append({"external_id": f"{lab}-0", "label": truth[f"{lab}-0"][0]})
        lines.append({"external_id": f"{lab}-1", "label": truth[f"{lab}-1"][0]})
    lines.append({"external_id": "social-2", "label": "professional"})
    reviewed.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--from-task", "llm_classify", "--confirmed", str(reviewed)]
        + ["--base", str(tiny_base), "--out", str(tmp_path / "m"), "--epochs", "1", "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["distilled"]
    assert (d["kept"], d["not_confirmed"]) == (16, 24)


def test_reviewed_id_two_sources_hold(
    db_url: str, broker_url: str, tmp_path: Path, tiny_base: Path
) -> None:
    # `<label>-0` is held by `fleet ingest` and by crm; a line without a source for
    # it confirms neither item (as `fleet eval` leaves it unscored), one that names
    # its source confirms that source's item only.
    truth = _store_llm_results(db_url, crm=True)
    legacy = [
        {"external_id": f"{lab}-{i}", "label": truth[f"{lab}-{i}"][0]}
        for lab in WORDS
        for i in (0, 1, 2)
    ]
    examples, rep = distilled_examples(
        db_url,
        task="llm_classify",
        confirmed=GoldLabels.of({x["external_id"]: x["label"] for x in legacy}),
    )
    assert (rep.seen, rep.kept, rep.ambiguous, rep.not_confirmed) == (48, 16, 16, 16)
    assert not any("kites" in ex.text for ex in examples)

    named = tmp_path / "named.jsonl"
    lines = [
        {"external_id": f"{lab}-0", "source": "crm", "label": truth[f"{lab}-0"][0]} for lab in WORDS
    ] + [{"external_id": f"{lab}-1", "label": truth[f"{lab}-1"][0]} for lab in WORDS]
    named.write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples, rep = distilled_examples(db_url, task="llm_classify", confirmed=load_gold(named))
    assert (rep.kept, rep.ambiguous, rep.not_confirmed) == (16, 0, 32)
    assert sum("kites" in ex.text for ex in examples) == 8  # crm's, not ingest's

    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--from-task", "llm_classify", "--confirmed", str(named)]
        + ["--base", str(tiny_base), "--out", str(tmp_path / "m"), "--epochs", "1", "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["distilled"]
    assert (d["kept"], d["ambiguous"], d["not_confirmed"]) == (16, 0, 32)

    # Some lines ambiguous: it trains on the rest, and the text output says what was
    # left out and what to add.
    mixed = tmp_path / "legacy.jsonl"
    mixed.write_text("".join(json.dumps(x) + "\n" for x in legacy))
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--from-task", "llm_classify", "--confirmed", str(mixed)]
        + ["--base", str(tiny_base), "--out", str(tmp_path / "m2"), "--epochs", "1"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert "16 reviewed results were left out" in result.output
    assert 'give those --confirmed lines a "source"' in result.output

    # Only ambiguous lines: nothing to train on, and the reason says what to add.
    only_shared = tmp_path / "shared.jsonl"
    only_shared.write_text(
        "".join(json.dumps(x) + "\n" for x in legacy if x["external_id"].endswith("-0"))
    )
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--from-task", "llm_classify", "--confirmed", str(only_shared)],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 2, result.output
    assert "16 confirmed by a line without a 'source'" in result.output
    assert "add the source to those lines" in result.output


def test_nothing_stored_says_what_to_run(db_url: str, broker_url: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--from-task", "llm_classify", "--min-confidence", "0.5"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 2  # a configuration error
    assert "fleet run --task llm_classify" in result.output
