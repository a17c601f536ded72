"""workers.train: the split, the metrics, the shipped data and (slow) a real fine-tune."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fleet.metrics import classification_report as compute_metrics
from workers.train import (
    INTENT_LABELS,
    METRICS_FILE,
    load_examples,
    ordered_labels,
    split_examples,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "fleet" / "data"
INTENT_DATA = DATA_DIR / "intent.jsonl"


def _examples() -> list[tuple[str, str]]:
    return (
        [(f"a{i}", "a") for i in range(10)]
        + [(f"b{i}", "b") for i in range(5)]
        + [(f"c{i}", "c") for i in range(2)]
        + [("d0", "d")]
    )


def test_split_is_stratified_disjoint_and_complete() -> None:
    examples = _examples()
    train, test = split_examples(examples, test_fraction=0.2, seed=0)
    assert sorted(train + test) == sorted(examples)
    assert not set(train) & set(test)
    held = Counter(lab for _, lab in test)
    # round(n * 0.2), at least one when a label has two or more, never all of a label
    assert held == {"a": 2, "b": 1, "c": 1}
    assert Counter(lab for _, lab in train) == {"a": 8, "b": 4, "c": 1, "d": 1}


def test_split_is_deterministic_and_seeded() -> None:
    examples = _examples()
    assert split_examples(examples, seed=0) == split_examples(examples, seed=0)
    held0 = sorted(split_examples(examples, seed=0)[1])
    assert any(sorted(split_examples(examples, seed=s)[1]) != held0 for s in range(1, 6))


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        split_examples(_examples(), test_fraction=1.0)


def test_metrics_on_a_hand_computed_example() -> None:
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = compute_metrics(gold, pred, ["a", "b", "c"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2, R 2/3, F1 0.8;  b: P 1/2, R 1/2, F1 0.5;  c: P 1/2, R 1, F1 2/3
    assert m["per_label"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_label"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["per_label"]["c"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion"] == {
        "a": {"a": 2, "b": 1, "c": 0},
        "b": {"a": 0, "b": 1, "c": 1},
        "c": {"a": 0, "b": 0, "c": 1},
    }


def test_metrics_count_a_never_predicted_label_as_zero() -> None:
    m = compute_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    assert m["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_label"]["a"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_load_examples_reports_the_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hi there you", "label": "chitchat"}\n\n{"text": "", "label": "x"}\n')
    with pytest.raises(ValueError, match=":3:"):
        load_examples(p)


def test_shipped_intent_data() -> None:
    examples = load_examples(INTENT_DATA)
    counts = Counter(lab for _, lab in examples)
    assert set(counts) == set(INTENT_LABELS)
    assert min(counts.values()) >= 75
    texts = [t.strip().lower() for t, _ in examples]
    assert len(texts) == len(set(texts)), "duplicate training lines"
    assert ordered_labels(counts) == list(INTENT_LABELS)
    assert any("\nassistant: " in t for t in texts)


def test_shipped_demo_files() -> None:
    rows = [json.loads(line) for line in (DATA_DIR / "sample_conversations.jsonl").open()]
    assert len(rows) == 48
    assert len({r["external_id"] for r in rows}) == 48
    assert Counter(r["meta"]["gold_intent"] for r in rows) == {lab: 6 for lab in INTENT_LABELS}
    assert all(1 <= len(r["messages"]) <= 4 for r in rows)
    train_texts = {t.lower() for t, _ in load_examples(INTENT_DATA)}
    for r in rows:
        for msg in r["messages"]:
            assert msg["content"].lower() not in train_texts
    lines = (DATA_DIR / "sample_speech.txt").read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        sentence, label = line.split("\t")
        assert label in INTENT_LABELS
        assert 6 <= len(sentence.split()) <= 12


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on 2 idle cores; leave room for a busy machine
def test_train_intent_on_shipped_data(trained_intent: tuple[Path, dict, list]) -> None:
    from transformers import AutoModelForSequenceClassification

    from workers.train import predict

    out, metrics, events = trained_intent

    assert metrics["accuracy"] > 0.85, metrics
    assert metrics["n_train"] + metrics["n_test"] == len(load_examples(INTENT_DATA))
    assert set(metrics["test_per_label"]) == set(INTENT_LABELS)
    assert json.loads((out / METRICS_FILE).read_text())["accuracy"] == metrics["accuracy"]
    assert (out / "model.safetensors").is_file()
    assert not events or any(e["stage"] == "epoch" for e in events)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert sorted(model.config.id2label.values()) == sorted(INTENT_LABELS)
    [label] = predict(out, ["user: Can you look up the refund policy in our FAQ?"])
    assert label in INTENT_LABELS
