"""`fleet train` through the real CLI: a tiny random BERT as the base, trained from a CSV;
the bad-data errors and their exit code."""

from __future__ import annotations

import csv
import json
import stat
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
    from fleet.models.folders import current_umask

    umask = current_umask()
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
    # Workers run as another user (k8s runAsUser, systemd User=): readable as the umask allows.
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        p.name: 0o666 & ~umask for p in out.iterdir()
    }
    # The temperature is fitted on the held-out split and stored beside the weights.
    stored = json.loads((out / "calibration.json").read_text())
    assert stored["temperature"] == report["calibration"]["temperature"] > 0
    assert stored["n"] == report["n_test"] and stored["nll_after"] <= stored["nll_before"]
    assert report["calibration"]["test"]["n"] == len(rows)
    assert not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*"))
    assert list(AutoConfig.from_pretrained(out).id2label.values()) == list(INTENT_LABELS)
    # trained as the bundled intent tier serves: 256-token windows, written into the folder
    reading = json.loads((out / "config.json").read_text())["fleet_reading"]
    assert reading["max_length"] == 256 and reading["pooling"] == "margin"
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
    from config.taskconfig import TierSpec
    from workers.adapters.base import Prediction, Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    adapter = SequenceClassifyAdapter()
    adapter.load(TierSpec(name="t", path=str(out), max_length=256), str(out), "cpu")
    source = Source(1, "conversation", "c1", {"messages": [{"role": "user", "content": "hi"}]})
    [pred] = adapter.predict([adapter.prepare(source)])
    assert isinstance(pred, Prediction) and pred.label in INTENT_LABELS
    assert pred.output is not None and pred.output["calibrated"] is True


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
    assert "calibration: temperature" in result.output
    assert "[[tasks.intent.ladder]]" in result.output
    [folder] = (tmp_path / "state" / "trained").glob("intent-trained-*")  # not FLEET_MODELS_DIR
    assert not (tmp_path / "models").exists()
    assert "train intent: step 1/" in result.output  # progress lines: the output is no terminal
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
    assert reading == {
        "max_length": 64,
        "pooling": "max",
        "max_windows": 16,
        "window_overlap": 32,
        "window_by": "tokens",
        "turn_context": 0,
    }
    assert "max_length = 64" in report["toml"] and 'pooling = "max"' in report["toml"]

    from config.taskconfig import TierSpec
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


SEVERITY = {
    "urgent": "the server is down and customers cannot pay for",
    "routine": "when you get a chance could you look at",
}


def test_train_creates_a_new_task_and_writes_its_entry(tmp_path: Path, tiny_base: Path) -> None:
    rows = [(f"{p} {t}", lab, 1.0) for lab, p in SEVERITY.items() for t in TOPICS]
    config = tmp_path / "mine.toml"
    config.write_text('[sources.app]\ntable = "app.conversations"\n')
    env = {**_env(tmp_path), "FLEET_CONFIG_FILE": str(config)}
    result = CliRunner().invoke(
        main,
        ["train", "--task", "triage", "--kind", "sequence_classify"]
        + ["--data", str(_csv(tmp_path / "d.csv", rows)), "--base", str(tiny_base)]
        + ["--epochs", "1", "--write-config"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "state" / "trained").glob("triage-trained-*")
    assert (folder / "model.safetensors").is_file()
    assert f"task entry appended to {config}" in result.output and "[tasks.triage]" in result.output

    from config.taskconfig import load_tasks

    tasks = load_tasks(config)
    assert "intent" in tasks  # the bundled tasks stay
    triage = tasks["triage"]
    assert triage.kind == "sequence_classify" and list(triage.labels) == ["routine", "urgent"]
    assert [t.path for t in triage.ladder] == [str(folder.resolve())]
    listed = CliRunner().invoke(main, ["tasks", "--json"], env=env)
    assert any(
        t["name"] == "triage" and t["ladder"][0]["present"]
        for t in json.loads(listed.output)["tasks"]
    )

    again = CliRunner().invoke(
        main,
        ["train", "--task", "triage", "--data", str(tmp_path / "d.csv"), "--base", str(tiny_base)]
        + ["--epochs", "1", "--write-config"],
        env=env,
    )
    assert again.exit_code == 2 and "already defines task 'triage'" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "triage", "--data", "d.csv"], "give --kind sequence_classify"),
        (["--task", "triage", "--kind", "sequence_classify"], "give --kind sequence_classify"),
        (
            ["--task", "intent", "--data", "d.csv", "--write-config"],
            "--write-config needs FLEET_CONFIG_FILE",
        ),
    ],
)
def test_train_says_what_a_new_task_needs(tmp_path: Path, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "d.csv", [("a", "x", 1.0), ("b", "y", 1.0)])
    result = CliRunner().invoke(main, ["train", *args], env=_env(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_calibration_folds_fit_the_temperature_on_every_example(
    tmp_path: Path, tiny_base: Path
) -> None:
    """--calibration-folds K: the temperature comes from out-of-fold logits of K
    cross-fitted models over the whole file, not from the 20 % one split held out."""
    rows = [(f"{p} {t}", lab, 1.0) for lab, p in PHRASES.items() for t in TOPICS[:5]]
    out = tmp_path / "trained"
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--data", str(_csv(tmp_path / "d.csv", rows))]
        + ["--base", str(tiny_base), "--epochs", "1", "--out", str(out)]
        + ["--calibration-folds", "2", "--json"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cal = report["calibration"]
    stored = json.loads((out / "calibration.json").read_text())
    assert stored["n"] == len(rows) != report["n_test"]  # every line, once, out of fold
    assert "2-fold cross-fitting" in stored["fitted_on"]
    assert stored["temperature"] == cal["temperature"] > 0
    assert cal["out_of_fold"]["n"] == len(rows) and cal["validation"]["n"] == report["n_test"]
    assert cal["split_temperature"] > 0 and report["config"]["calibration_folds"] == 2
    assert f"| out of fold (fitted on it) | {len(rows)} |" in (out / "README.md").read_text()
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize(
    "args", [["--calibration-folds", "1"], ["--calibration-folds", "3", "--multi-label"]]
)
def test_calibration_folds_refuse_what_cannot_be_cross_fitted(
    tmp_path: Path, args: list[str]
) -> None:
    data = _csv(tmp_path / "d.csv", [("a", "x", 1.0), ("b", "y", 1.0)])
    result = CliRunner().invoke(
        main, ["train", "--task", "intent", "--data", str(data), *args], env=_env(tmp_path)
    )
    assert result.exit_code == 2
    assert "--calibration-folds takes 0" in result.output


def test_calibration_data_fits_the_temperature_on_that_file(
    tmp_path: Path, tiny_base: Path
) -> None:
    """--calibration-data FILE: the temperature is the one that file's logits fit (text
    like what will be served, written apart from --data), not the held-out split's;
    the split's own temperature is kept beside it for comparison."""
    from fleet.models.temperature import folder_logits
    from workers.calibration import calibrate

    rows = [(f"{p} {t}", lab, 1.0) for lab, p in PHRASES.items() for t in TOPICS[:5]]
    held = [(f"so, {p} {t} today", lab, 1.0) for lab, p in PHRASES.items() for t in TOPICS[5:]]
    calib = _csv(tmp_path / "calibration.csv", held)
    out = tmp_path / "trained"
    result = CliRunner().invoke(
        main,
        ["train", "-t", "intent", "--data", str(_csv(tmp_path / "d.csv", rows))]
        + ["--base", str(tiny_base), "--epochs", "1", "--out", str(out)]
        + ["--calibration-data", str(calib), "--json"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cal = report["calibration"]
    stored = json.loads((out / "calibration.json").read_text())
    logits, names = folder_logits(out, [text for text, _, _ in held], max_length=256)
    expected = calibrate(logits, [names.index(lab) for _, lab, _ in held])
    assert stored["temperature"] == cal["temperature"] == round(expected.temperature, 6)
    assert stored["n"] == len(held) and "calibration set calibration.csv" in stored["fitted_on"]
    assert cal["calibration_set"]["n"] == len(held) and cal["validation"]["n"] == report["n_test"]
    assert cal["calibration_data"] == "calibration.csv" and len(cal["calibration_sha256"]) == 64
    assert cal["split_temperature"] > 0
    assert report["config"]["calibration_data"] == str(calib)
    assert f"| calibration.csv (fitted on it) | {len(held)} |" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calibration-data", "missing.jsonl"], "no such file"),
        (["--calibration-data", "bundled"], "ships no calibration file"),
        (["--calibration-folds", "2", "--calibration-data", "d.csv"], "not with"),
    ],
)
def test_calibration_data_refuses_what_it_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "d.csv", [("a", "x", 1.0), ("b", "y", 1.0)])
    result = CliRunner().invoke(
        main, ["train", "--task", "intent", "--data", "d.csv", *extra], env=_env(tmp_path)
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_train_composes_requests_among_small_talk(tmp_path: Path, tiny_base: Path) -> None:
    """`--compose-with FILE` adds each request among the file's small talk (its label)
    and small talk alone (the tier's background label); the metrics and the card say
    how many, and the printed line counts them apart from the written examples."""
    config = tmp_path / "tasks.toml"
    config.write_text(
        '[tasks.triage]\nkind = "sequence_classify"\n'
        'labels = { urgent = "act now", idle = "small talk" }\n'
        '[[tasks.triage.ladder]]\npath = "mine"\nmax_length = 64\n'
        'background_labels = ["idle"]\n'
    )
    filler = tmp_path / "talk.jsonl"
    filler.write_text(
        "".join(
            json.dumps({"role": role, "content": line}) + "\n"
            for role, line in [
                ("user", "nice weather"),
                ("user", "haha yes"),
                ("assistant", "Indeed!"),
                ("assistant", "Sure thing."),
            ]
        )
    )
    rows = [(f"server {t} is down, fix it now", "urgent", 1.0) for t in TOPICS] + [
        (f"hello, lovely {t} today", "idle", 1.0) for t in TOPICS
    ]
    out = tmp_path / "models" / "mine"
    args = ["train", "-t", "triage", "--data", str(_csv(tmp_path / "d.csv", rows))]
    args += ["--base", str(tiny_base), "--epochs", "1", "--out", str(out)]
    env = {**_env(tmp_path), "FLEET_CONFIG_FILE": str(config)}
    result = CliRunner().invoke(
        main, [*args, "--compose-with", str(filler), "--compose-per-example", "2"], env=env
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "training_metrics.json").read_text())
    composed = metrics["composed"]
    requests_in_training = metrics["train_per_label"]["urgent"]
    assert composed["added_per_label"]["urgent"] == 2 * requests_in_training
    assert composed["added_per_label"]["idle"] >= 1  # small talk alone, as the background
    assert composed["filler"] == "talk.jsonl" and composed["per_example"] == 2
    assert f"+ {composed['added']} composed with talk.jsonl" in result.output
    assert "composed conversations:" in (out / "README.md").read_text()

    missing = CliRunner().invoke(main, [*args, "--compose-with", "nope.jsonl"], env=env)
    assert missing.exit_code == 2 and "no such file" in missing.output
    multi = CliRunner().invoke(main, [*args, "--multi-label", "--compose-with", "bundled"], env=env)
    assert multi.exit_code == 2 and "not with --multi-label" in multi.output
