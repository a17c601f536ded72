"""`fleet train --multi-label` through the real CLI on a CSV and a JSONL file (a tiny
random BERT as the base), served back through the adapter; the label-set data checks,
the split and the threshold fit (fleet.models.multilabel, fleet.models.labeled)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.models import multilabel
from fleet.models.labeled import Example, TrainingDataError, load_labeled
from tests.support import build_tiny_classifier

PHRASES = {
    "angry": "I am furious that",
    "hopeful": "I really hope that soon",
    "worried": "I keep worrying that",
}
TOPICS = ["the rent", "my exam", "the train", "my sister", "the project", "the weather"]
NAMES = sorted(PHRASES)


def _rows() -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    for t in TOPICS:
        for lab, p in PHRASES.items():
            rows.append((f"{p} {t}", [lab]))
        rows.append(
            (f"{PHRASES['worried']} {t} but {PHRASES['hopeful']} it works", ["hopeful", "worried"])
        )
        rows.append((f"the schedule for {t} is on the board", []))
    return rows


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("base") / "tiny", labels=["x", "y"])


def _env(tmp_path: Path) -> dict[str, str]:
    return {"FLEET_STATE_DIR": str(tmp_path / "state"), "FLEET_MODELS_DIR": str(tmp_path / "m")}


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.toml"
    path.write_text(
        "include_bundled = false\n[labels.emotion]\n"
        + "".join(f'{n} = "{n}"\n' for n in NAMES)
        + '[tasks.emotion]\nkind = "sequence_classify"\nlabels = "emotion"\n'
        '[[tasks.emotion.ladder]]\nname = "e"\npath = "emotion-minilm"\nmax_length = 64\n'
    )
    return path


def _train(tmp_path: Path, base: Path, data: Path, *extra: str) -> dict:
    out = tmp_path / f"out-{data.suffix[1:]}"
    env = {**_env(tmp_path), "FLEET_CONFIG_FILE": str(_config(tmp_path))}
    result = CliRunner().invoke(
        main,
        ["train", "--task", "emotion", "--multi-label", "--data", str(data), "--base", str(base)]
        + ["--out", str(out), "--epochs", "2", "--lr", "5e-3", "--json", *extra],
        env=env,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _serve(folder: Path, texts: list[str]) -> list:
    from config.taskconfig import TierSpec
    from workers.adapters.base import Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    a = SequenceClassifyAdapter(labels=NAMES)
    a.load(TierSpec(name="t", path=str(folder), max_length=64), str(folder), "cpu")
    assert a.multi_label
    batch = [
        a.prepare(Source(i, "conversation", f"e{i}", {"text": t})) for i, t in enumerate(texts)
    ]
    return a.predict(batch)


def _check_folder(report: dict, folder: Path) -> None:
    assert report["multi_label"] is True and report["labels"] == NAMES
    config = json.loads((folder / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    stored = json.loads((folder / "thresholds.json").read_text())
    assert set(stored["thresholds"]) == set(NAMES)
    assert stored["thresholds"] == {n: f["threshold"] for n, f in report["thresholds"].items()}
    assert all(0.0 <= t <= 1.0 for t in stored["thresholds"].values())
    cal = json.loads((folder / "calibration.json").read_text())
    assert cal["temperature"] == report["calibration"]["temperature"] > 0
    assert cal["method"].startswith("temperature scaling of a multi-label model's sigmoids")
    assert cal["nll_after"] <= cal["nll_before"]
    val = report["validation_scores"]
    assert {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "per_label"} <= set(val)
    assert report["config"]["class_weighting"] == "none"  # the multi-label default
    card = (folder / "README.md").read_text()
    assert "multi-label" in card and "thresholds.json" in card


def test_round_trip_from_csv(tmp_path: Path, tiny_base: Path) -> None:
    data = tmp_path / "emotion.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "labels"])
        w.writerows((text, ";".join(labels)) for text, labels in _rows())
    report = _train(tmp_path, tiny_base, data)
    folder = Path(report["folder"])
    _check_folder(report, folder)
    assert report["n_train"] + report["n_test"] == len(_rows())
    assert report["train_without_label"] >= 1  # texts with none of the labels train too
    preds = _serve(folder, ["I keep worrying that the rent", "the schedule is on the board"])
    thresholds = {n: f["threshold"] for n, f in report["thresholds"].items()}
    for p in preds:
        out = p.output
        assert out["multi_label"] and out["thresholds"] == pytest.approx(thresholds)
        assert out["thresholds_from"] == "thresholds.json" and out["calibrated"] is True
        assert set(p.scores) == set(NAMES)
        kept = sorted(n for n in NAMES if p.scores[n] >= thresholds[n])
        assert sorted(out["labels"]) == kept
        assert p.label == (";".join(kept) or None)


def test_round_trip_from_jsonl_with_a_test_file(tmp_path: Path, tiny_base: Path) -> None:
    data = tmp_path / "emotion.jsonl"
    lines = [{"text": t, "labels": labs} for t, labs in _rows()]
    lines.append(
        {
            "messages": [
                {"role": "user", "content": "I am furious that the train is late again"},
                {"role": "assistant", "content": "That sounds frustrating."},
            ],
            "labels": ["angry"],
        }
    )
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    test = tmp_path / "test.jsonl"
    test.write_text(
        json.dumps({"text": "I keep worrying that my exam", "labels": ["worried"]})
        + "\n"
        + json.dumps({"text": "lunch is at noon", "labels": []})
        + "\n"
    )
    report = _train(tmp_path, tiny_base, data, "--test", str(test))
    _check_folder(report, Path(report["folder"]))
    assert report["test"]["n"] == 2 and report["test_data"] == "test.jsonl"
    assert report["calibration"]["test"]["n"] == 2


@pytest.mark.parametrize(
    ("body", "extra", "message"),
    [
        ("text,labels\nhi,angry\n", (), "no example has hopeful, worried"),
        ("text,labels\nhi,angry;bored\nho,\n", (), "labels the task does not have: bored"),
        ("text,label\nhi,angry\n", ("--from-task", "emotion"), "--multi-label trains on a file"),
    ],
)
def test_bad_label_sets_exit_2(tmp_path: Path, body: str, extra: tuple, message: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(body)
    env = {**_env(tmp_path), "FLEET_CONFIG_FILE": str(_config(tmp_path))}
    args = ["train", "--task", "emotion", "--multi-label"]
    args += list(extra) if extra else ["--data", str(data)]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_labels_column_without_the_flag_names_it(tmp_path: Path) -> None:
    data = tmp_path / "sets.csv"
    data.write_text("text,labels\nhi,angry;worried\n")
    with pytest.raises(TrainingDataError, match="--multi-label"):
        load_labeled(data)


def test_reading_label_sets(tmp_path: Path) -> None:
    data = tmp_path / "sets.jsonl"
    data.write_text(
        '{"text": "a", "labels": ["worried", "hopeful", "worried"]}\n'
        '{"text": "b", "labels": "angry; worried"}\n'
        '{"text": "c", "labels": []}\n'
    )
    got = load_labeled(data, multi_label=True)
    assert [ex.labels for ex in got] == [("hopeful", "worried"), ("angry", "worried"), ()]
    assert [ex.label for ex in got] == ["hopeful;worried", "angry;worried", ""]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "labels": [1]}\n')
    with pytest.raises(TrainingDataError, match="bad.jsonl:1: 'labels' must be a list"):
        load_labeled(bad, multi_label=True)
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(TrainingDataError, match="no 'labels'"):
        load_labeled(bad, multi_label=True)


def test_split_holds_out_every_label() -> None:
    exs = [Example.multi(f"t{i}", [NAMES[i % 3]] if i % 4 else []) for i in range(40)]
    exs.append(Example.multi("rare one", ["angry", "hopeful"]))
    exs.append(Example.multi("rare two", ["angry", "hopeful"]))
    train, valid = multilabel.split_label_sets(exs, test_fraction=0.25, seed=3)
    assert sorted(e.text for e in train + valid) == sorted(e.text for e in exs)
    assert {n for e in valid for n in e.labels or ()} == set(NAMES)
    assert any(not e.labels for e in valid)
    assert multilabel.split_label_sets(exs, test_fraction=0.25, seed=3) == (train, valid)


def test_fit_thresholds_maximises_each_labels_f1() -> None:
    # label a: positives at 0.35 and 0.8, negatives at 0.3 and 0.1 -> cut between 0.3 and 0.35
    probs = [[0.8, 0.9], [0.35, 0.2], [0.3, 0.6], [0.1, 0.1]]
    gold = [[1, 0], [1, 0], [0, 0], [0, 0]]
    fitted = multilabel.fit_thresholds(probs, gold, ["a", "b"])
    assert fitted["a"]["threshold"] == pytest.approx(0.325)
    assert fitted["a"]["f1"] == 1.0 and fitted["a"]["f1_at_default"] == pytest.approx(2 / 3)
    # b has no positive held out: its F1 cannot be measured, 0.5 stays
    assert fitted["b"] == {
        "threshold": 0.5,
        "f1": None,
        "f1_at_default": None,
        "positives": 0,
        "fitted": False,
    }


def test_positive_weights_balance_rare_labels() -> None:
    exs = [Example.multi("x", ["a"])] + [Example.multi("y", ["b"])] * 3
    assert multilabel.positive_weights(exs, ["a", "b", "c"]) == [3.0, 1 / 3, 1.0]


def test_calibrate_refits_a_multi_label_folders_temperature_and_thresholds(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = tmp_path / "emotion.jsonl"
    data.write_text("".join(json.dumps({"text": t, "labels": labs}) + "\n" for t, labs in _rows()))
    env = {**_env(tmp_path), "FLEET_CONFIG_FILE": str(_config(tmp_path))}
    folder = tmp_path / "m" / "emotion-minilm"  # the task's first tier
    trained = CliRunner().invoke(
        main,
        ["train", "--task", "emotion", "--multi-label", "--data", str(data), "--base"]
        + [str(tiny_base), "--out", str(folder), "--epochs", "1", "--json"],
        env=env,
    )
    assert trained.exit_code == 0, trained.output
    (folder / "thresholds.json").unlink()
    result = CliRunner().invoke(
        main, ["calibrate", "--task", "emotion", "--data", str(data), "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert set(got["thresholds"]) == set(NAMES) and got["scores"]["n"] == len(_rows())
    stored = json.loads((folder / "thresholds.json").read_text())
    assert stored["thresholds"] == got["thresholds"] and stored["fitted_on"] == "emotion.jsonl"
    assert (
        json.loads((folder / "calibration.json").read_text())["temperature"] == got["temperature"]
    )
