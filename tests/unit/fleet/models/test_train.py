"""fleet.models.finetune and fleet.models.labeled: reading, checking and splitting labeled data, the
shipped sets, and (slow) a real fine-tune of the bundled intent classifier."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from config.data import data_path
from config.taskconfig import load_tasks
from fleet.models.catalogue import BUNDLED
from fleet.models.finetune import INTENT_LABELS, METRICS_FILE, ordered_labels, tier_toml
from fleet.models.labeled import (
    Example,
    TrainingDataError,
    check_labels,
    class_weights,
    data_hash,
    load_labeled,
    split_examples,
)
from fleet.reporting.scoring import classification_report as compute_metrics
from tests.support import REPO

DATA_DIR = REPO / "config" / "data"
INTENT_DATA = DATA_DIR / "intent.jsonl"


def _examples() -> list[Example]:
    return (
        [Example(f"a{i}", "a") for i in range(10)]
        + [Example(f"b{i}", "b") for i in range(5)]
        + [Example(f"c{i}", "c") for i in range(2)]
        + [Example("d0", "d")]
    )


def _key(ex: Example) -> tuple[str, str]:
    return ex.text, ex.label


def test_split_is_stratified_disjoint_and_complete() -> None:
    examples = _examples()
    train, test = split_examples(examples, test_fraction=0.2, seed=0)
    assert sorted(map(_key, train + test)) == sorted(map(_key, examples))
    assert not set(train) & set(test)
    # round(n * 0.2), at least one when a label has two or more, never all of a label
    assert Counter(ex.label for ex in test) == {"a": 2, "b": 1, "c": 1}
    assert Counter(ex.label for ex in train) == {"a": 8, "b": 4, "c": 1, "d": 1}


def test_split_is_deterministic_and_seeded() -> None:
    examples = _examples()
    assert split_examples(examples, seed=0) == split_examples(examples, seed=0)
    held0 = sorted(map(_key, split_examples(examples, seed=0)[1]))
    assert any(sorted(map(_key, split_examples(examples, seed=s)[1])) != held0 for s in range(1, 6))


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
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion"]["b"] == {"a": 0, "b": 1, "c": 1}


def test_class_weights_are_balanced() -> None:
    # n / (k * count): 18 / (4 * 10), 18 / (4 * 5), 18 / (4 * 2), 18 / (4 * 1)
    assert class_weights(_examples(), ["a", "b", "c", "d"]) == pytest.approx([0.45, 0.9, 2.25, 4.5])


def test_data_hash_follows_content_and_order() -> None:
    ex = _examples()
    assert data_hash(ex) == data_hash(list(ex))
    assert data_hash(ex) != data_hash(ex[::-1])
    assert data_hash(ex) != data_hash([Example("a0", "a", 0.5), *ex[1:]])


def test_csv_with_the_older_jobs_columns(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(
        'message,category,confidence\n"Hello, how are you?",chitchat,0.9\n\nlook it up,rag_query,\n'
    )
    assert load_labeled(p) == [
        Example("Hello, how are you?", "chitchat", 0.9),
        Example("look it up", "rag_query", 1.0),
    ]


def test_conversations_become_the_served_text(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"conversations": [{"messages": msgs, "label": "chitchat"}]}))
    assert load_labeled(p) == [Example("user: hi\nassistant: hello", "chitchat")]
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"external_id": "x", "messages": msgs, "meta": {"label": "social"}}))
    assert load_labeled(j) == [Example("user: hi\nassistant: hello", "social")]


@pytest.mark.parametrize(
    ("name", "body", "match"),
    [
        ("d.csv", "text,label,source\nhi,a,web\n", r"d.csv:2: unknown column\(s\) 'source'"),
        ("d.jsonl", '{"text": "hi", "label": "a", "lang": "en"}\n', r"unknown column\(s\) 'lang'"),
        ("d.csv", "text,label\nhi,a\n  ,b\n", r"d.csv:3: empty text"),
        (
            "d.jsonl",
            '{"text": "hi", "label": "a"}\n\n{"text": "", "label": "x"}\n',
            r":3: empty text",
        ),
        ("d.jsonl", '{"text": "hi"}\n', r":1: no label"),
        ("d.csv", "text,label,weight\nhi,a,-1\n", r"positive number"),
        ("d.csv", "text,label,weight\nhi,a,lots\n", r"not a number"),
        ("d.jsonl", '{"text": "hi", "label": "a"}\nnot json\n', r":2: not valid JSON"),
        ("d.jsonl", '{"messages": [], "label": "a"}\n', r"conversation has no messages"),
        ("d.txt", "hi\ta\n", r"unknown file type"),
        ("d.csv", "", r"empty CSV"),
    ],
)
def test_bad_files_say_where_and_what(tmp_path: Path, name: str, body: str, match: str) -> None:
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(TrainingDataError, match=match):
        load_labeled(p)


def test_label_checks() -> None:
    two = [Example("x", "a"), Example("y", "b")]
    with pytest.raises(TrainingDataError, match="only one label"):
        check_labels([Example("x", "a"), Example("y", "a")], None)
    with pytest.raises(TrainingDataError, match="no examples of c"):
        check_labels(two, ["a", "b", "c"])
    with pytest.raises(TrainingDataError, match="labels the task does not have: b"):
        check_labels(two, ["a"])
    assert check_labels(two, ["b", "a"]) == ["b", "a"]  # the task's order: the model's ids
    assert check_labels(two, None) == ["a", "b"]


def test_tier_toml_parses_into_a_ladder(tmp_path: Path) -> None:
    import tomllib

    doc = tomllib.loads(
        '[tasks.intent]\nkind = "sequence_classify"\n' + tier_toml("intent", "m", tmp_path / "m")
    )
    assert doc["tasks"]["intent"]["ladder"] == [
        {
            "name": "m",
            "path": str(tmp_path / "m"),
            "max_length": 256,
            "max_batch_tokens": 8192,
            "pooling": "salient",
            "window_overlap": 32,
            "max_windows": 16,
        }
    ]


def test_shipped_intent_data() -> None:
    examples = load_labeled(INTENT_DATA)
    counts = Counter(ex.label for ex in examples)
    assert set(counts) == set(INTENT_LABELS)
    assert min(counts.values()) >= 110
    texts = [ex.text.strip().lower() for ex in examples]
    assert len(texts) == len(set(texts)), "duplicate training lines"
    assert ordered_labels(counts) == list(INTENT_LABELS)
    assert sum("\nassistant: " in t for t in texts) >= 40


@pytest.mark.parametrize("folder", sorted(BUNDLED))
def test_bundled_sets_match_their_tasks_and_stay_apart_from_their_eval(folder: str) -> None:
    b = BUNDLED[folder]
    spec = load_tasks(None)[b.task]
    assert spec.kind == "sequence_classify"
    assert spec.ladder[0].path == b.folder
    train, held = load_labeled(data_path(b.data)), load_labeled(data_path(b.eval))
    assert check_labels(train, list(spec.labels)) == list(spec.labels)
    assert {ex.label for ex in held} == set(spec.labels)
    assert len(held) >= 60
    assert not {ex.text.lower() for ex in train} & {ex.text.lower() for ex in held}


def test_shipped_demo_files() -> None:
    rows = [json.loads(line) for line in (DATA_DIR / "sample_conversations.jsonl").open()]
    assert len(rows) == 48
    assert len({r["external_id"] for r in rows}) == 48
    assert Counter(r["meta"]["gold_intent"] for r in rows) == {lab: 6 for lab in INTENT_LABELS}
    assert all(1 <= len(r["messages"]) <= 4 for r in rows)
    train_texts = {ex.text.lower() for ex in load_labeled(INTENT_DATA)}
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

    from fleet.models.finetune import predict

    out, metrics, events = trained_intent

    assert metrics["accuracy"] > 0.85, metrics
    assert metrics["n_train"] + metrics["n_test"] == len(load_labeled(INTENT_DATA))
    assert set(metrics["test_per_label"]) == set(INTENT_LABELS)
    assert metrics["test"]["n"] >= 100  # the independent set was scored too
    assert json.loads((out / METRICS_FILE).read_text())["accuracy"] == metrics["accuracy"]
    assert (out / "model.safetensors").is_file()
    assert not events or any(e["stage"] == "epoch" for e in events)

    # trained as the bundled tier reads (by user turn: small-talk turns alone composed
    # too), the same folder `fleet models prepare` builds: never found stale and retrained
    from fleet.models.catalogue import BUNDLED, INTENT
    from fleet.models.prepare import bundled_is_stale

    assert metrics["composed"]["by_turn"] is True
    assert bundled_is_stale(out, BUNDLED[INTENT]) is None

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert list(model.config.id2label.values()) == list(INTENT_LABELS)
    [label] = predict(out, ["user: Can you look up the refund policy in our FAQ?"])
    assert label in INTENT_LABELS


def test_tier_toml_carries_a_reading_by_user_turn(tmp_path: Path) -> None:
    import tomllib

    from workers.adapters.windowed import Reading

    reading = Reading(128, "margin", 64, 32, "user_turns", 16)
    doc = tomllib.loads(
        '[tasks.topic]\nkind = "sequence_classify"\n'
        + tier_toml("topic", "m", tmp_path / "m", reading=reading)
    )
    tier = doc["tasks"]["topic"]["ladder"][0]
    assert Reading.from_options(tier["max_length"], tier) == reading


def test_progress_lines_show_no_nan_loss_before_the_first_logged_one() -> None:
    """The trainer's loss is NaN until its first logging step: the line says so
    plainly ("loss -") instead of printing "loss nan", which reads as a diverged run."""
    from fleet.models.training import training_lines

    lines: list[str] = []
    update = training_lines("intent", lines.append, every=0.0)
    event = {"stage": "train", "step": 1, "total_steps": 10, "epoch": 1, "epochs": 2}
    update({**event, "loss": float("nan")})
    update({**event, "step": 2, "loss": 2.0816})
    assert lines == [
        "train intent: step 1/10 epoch 1/2 loss -",
        "train intent: step 2/10 epoch 1/2 loss 2.082",
    ]


def test_trainer_events_count_epochs_from_one_and_validation_in_examples() -> None:
    """The Trainer's fractional epoch is 1.0 at the last step of the first epoch: the
    bar says epoch 1/1 there, not 2/1; validation progress counts examples (the
    evaluation loader counts batches), so "evaluated validation (36 examples)" is true."""
    from types import SimpleNamespace

    import torch

    from fleet.models.trainer import progress_callback

    events: list[dict[str, object]] = []
    callback = progress_callback(events.append)
    args = SimpleNamespace(num_train_epochs=1, per_device_eval_batch_size=16)
    for step, epoch in ((1, 1 / 9), (9, 1.0)):
        callback.on_step_end(
            args, SimpleNamespace(epoch=epoch, global_step=step, max_steps=9), None
        )
    loader = torch.utils.data.DataLoader(list(range(36)), batch_size=16)
    for _ in range(len(loader)):
        callback.on_prediction_step(args, None, None, eval_dataloader=loader)
    assert [e["epoch"] for e in events[:2]] == [1, 1]
    assert [(e["done"], e["total"]) for e in events[2:]] == [(16, 36), (32, 36), (36, 36)]


def test_as_served_takes_the_reading_of_the_tier_serving_the_folder(tmp_path: Path) -> None:
    """A config without max_length reads as the tier serving the folder (the bundled
    intent tier: by user turn), so `train_intent` and `fleet models prepare` compose and
    window alike; a config with its own max_length is left as it is."""
    from config.taskconfig import load_tasks
    from fleet.models.classifier import TrainConfig
    from fleet.models.training import as_served

    spec = load_tasks(None)["intent"]
    served = as_served(TrainConfig(), spec, tmp_path / "intent-minilm")
    tier = spec.ladder[0]
    assert served.max_length == tier.max_length
    assert served.window_by == tier.options["window_by"] == "user_turns"
    assert served.pooling == tier.options["pooling"]
    own = TrainConfig(max_length=128)
    assert as_served(own, spec, tmp_path / "intent-minilm") is own
