"""`fleet train` through the real CLI: a tiny random BERT as the base, trained from a CSV;
the bad-data errors and their exit code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.models.finetune import INTENT_LABELS
from tests.support import build_tiny_classifier

PHRASES = {
    "rag_query": "search the handbook for",
    "professional": "my manager wants the report on",
    "psychological": "my anxiety keeps coming back about",
    "learning": "please explain how to study",
    "social": "my best friend and I argued about",
    "emotional": "I feel so sad right now about",
    "aspirational": "one day I dream of mastering",
    "chitchat": "haha tell me a joke about",
}
TOPICS = ["cats", "trains", "rain", "music", "soup", "maps", "bikes", "lamps"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("base") / "tiny", labels=["x", "y"])


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "FLEET_STATE_DIR": str(tmp_path / "state"),
        "FLEET_MODELS_DIR": str(tmp_path / "models"),
    }


def _csv(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["message", "category", "confidence"])
        w.writerows(rows)
    return path


def test_train_from_csv_writes_a_servable_folder(tmp_path: Path, tiny_base: Path) -> None:
    rows = [(f"{p} {t}", lab, 0.9) for lab, p in PHRASES.items() for t in TOPICS]
    data = _csv(tmp_path / "intent.csv", rows)
    out = tmp_path / "trained"
    result = CliRunner().invoke(
        main,
        ["train", "--task", "intent", "--data", str(data), "--base", str(tiny_base)]
        + ["--out", str(out), "--epochs", "3", "--lr", "5e-3", "--test", str(data), "--json"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["folder"] == str(out)
    assert report["labels"] == list(INTENT_LABELS)  # the task's order, not the file's
    assert report["n_train"] + report["n_test"] == len(rows)
    assert report["test_per_label"] == {lab: 2 for lab in sorted(INTENT_LABELS)}  # round(8 * 0.2)
    assert 1 <= report["epochs_run"] <= 3 and report["best_epoch"] is not None
    assert report["test"]["n"] == len(rows)
    assert report["class_weights"] == {lab: pytest.approx(1.0) for lab in INTENT_LABELS}

    from transformers import AutoConfig

    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*"))
    assert list(AutoConfig.from_pretrained(out).id2label.values()) == list(INTENT_LABELS)
    # trained as the bundled intent tier serves: 256-token windows, written into the folder
    reading = json.loads((out / "config.json").read_text())["fleet_reading"]
    assert reading["max_length"] == 256 and reading["pooling"] == "recency"
    assert report["config"]["max_length"] == 256 and "max_length = 256" in report["toml"]
    saved = json.loads((out / "training_metrics.json").read_text())
    assert saved["data_sha256"] == report["data_sha256"] and saved["base_model"] == str(tiny_base)
    card = (out / "README.md").read_text()
    assert (
        report["data_sha256"] in card
        and str(tiny_base) in card
        and "[[tasks.intent.ladder]]" in card
    )

    # The folder serves: the sequence_classify adapter loads it and labels a conversation.
    from fleet.config.taskconfig import TierSpec
    from workers.adapters.base import Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    adapter = SequenceClassifyAdapter()
    adapter.load(TierSpec(name="t", path=str(out), max_length=256), str(out), "cpu")
    source = Source(1, "conversation", "c1", {"messages": [{"role": "user", "content": "hi"}]})
    [pred] = adapter.predict([adapter.prepare(source)])
    assert pred.label in INTENT_LABELS  # type: ignore[union-attr]


def test_human_output_shows_scores_and_the_toml_lines(tmp_path: Path, tiny_base: Path) -> None:
    rows = [(f"{p} {t}", lab, 1.0) for lab, p in PHRASES.items() for t in TOPICS[:4]]
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--data", str(_csv(tmp_path / "d.csv", rows))]
        + ["--base", str(tiny_base), "--epochs", "1", "--class-weights", "none"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    assert "[[tasks.intent.ladder]]" in result.output
    [folder] = (tmp_path / "models").glob("intent-trained-*")
    assert f'path = "{folder.resolve()}"' in result.output


def test_train_as_you_serve(tmp_path: Path, tiny_base: Path) -> None:
    """The served tier's reading (max_length, pooling) is what training windows with,
    what config.json and the printed TOML say, and a tier reading otherwise is refused."""
    config = tmp_path / "tasks.toml"
    config.write_text(
        '[tasks.intent]\nkind = "sequence_classify"\nlabels = { x = "one", y = "two" }\n'
        '[[tasks.intent.ladder]]\npath = "mine"\nmax_length = 64\npooling = "max"\n'
    )
    long = " ".join(["filler words about nothing in particular"] * 40)
    rows = [
        (f"{w} {t} {long if k % 2 else ''}", lab, 1.0)
        for k, t in enumerate(TOPICS)
        for lab, w in (("x", "alpha"), ("y", "beta"))
    ]
    out = tmp_path / "models" / "mine"
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--data", str(_csv(tmp_path / "d.csv", rows))]
        + ["--base", str(tiny_base), "--epochs", "1", "--out", str(out), "--json"],
        env={**_env(tmp_path), "FLEET_CONFIG_FILE": str(config)},
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reading = json.loads((out / "config.json").read_text())["fleet_reading"]
    assert reading == {"max_length": 64, "pooling": "max", "max_windows": 16, "window_overlap": 32}
    assert "max_length = 64" in report["toml"] and 'pooling = "max"' in report["toml"]

    from fleet.config.taskconfig import TierSpec
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    with pytest.raises(ValueError, match="trained on windows of 64 tokens"):
        SequenceClassifyAdapter().load(
            TierSpec(name="t", path=str(out), max_length=256), str(out), "cpu"
        )


def test_long_examples_train_on_every_window(tiny_base: Path) -> None:
    """A short example is one row with the ids serving reads; a long one a row per window."""
    from transformers import AutoTokenizer

    from fleet.models.finetune import Example, _encode
    from workers.adapters.windowed import Reading

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    long = "user: " + "so much to say " * 200 + "\nassistant: ok\nuser: find the handbook"
    data = _encode(
        tok, [Example("user: hi there", "x"), Example(long, "y")], {"x": 0, "y": 1}, Reading(64)
    )
    rows = [data[i] for i in range(len(data))]
    assert (
        rows[0]["input_ids"] == tok("user: hi there", truncation=True, max_length=64)["input_ids"]
    )
    assert len(rows) > 10 and {r["labels"] for r in rows[1:]} == {1}
    assert all(len(r["input_ids"]) <= 64 for r in rows)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("text,label\nhi,chitchat\nhello,chitchat\n", "only one label"),
        ("text,label,source\nhi,chitchat,web\n", "unknown column(s) 'source'"),
        ("text,label\nhi,chitchat\n   ,social\n", "empty text"),
        ("text,label\nhi,chitchat\nmy friend,social\n", "label set differs from the task's"),
    ],
)
def test_bad_data_exits_2_with_the_reason(tmp_path: Path, body: str, message: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(body)
    result = CliRunner().invoke(
        main, ["train", "--task", "intent", "--data", str(data)], env=_env(tmp_path)
    )
    assert result.exit_code == 2  # a configuration error
    assert message in result.output
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_only_sequence_classify_tasks_train(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", [("a", "x", 1.0), ("b", "y", 1.0)])
    result = CliRunner().invoke(
        main, ["train", "--task", "transcribe", "--data", str(data)], env=_env(tmp_path)
    )
    assert result.exit_code == 2  # a configuration error
    assert "trains sequence_classify tasks" in result.output


def test_a_missing_base_model_says_what_to_give(tmp_path: Path) -> None:
    rows = [(f"{p} {t}", lab, 1.0) for lab, p in PHRASES.items() for t in TOPICS[:2]]
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--data", str(_csv(tmp_path / "d.csv", rows))]
        + ["--base", str(tmp_path / "no-such-model")],
        env=_env(tmp_path),
    )
    assert result.exit_code == 2  # a configuration error
    assert "cannot load the base model" in result.output
