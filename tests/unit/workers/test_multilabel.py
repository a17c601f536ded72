"""What a multi-label classifier's answer is (workers.multilabel): thresholds from the tier,
the folder or 0.5; the label set, its column, its confidence; an empty set said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers import multilabel as ml

NAMES = ["angry", "hopeful", "worried"]


def test_thresholds_tier_over_folder_over_default(tmp_path: Path) -> None:
    (tmp_path / ml.THRESHOLDS_FILE).write_text(
        json.dumps({"thresholds": {"angry": 0.3, "hopeful": 0.7}})
    )
    stored = ml.read_thresholds(tmp_path, NAMES)
    values, sources = ml.resolve_thresholds(NAMES, stored, {"hopeful": 0.45})
    assert values == {"angry": 0.3, "hopeful": 0.45, "worried": 0.5}
    assert sources == {"angry": "thresholds.json", "hopeful": "tier", "worried": "default"}
    values, sources = ml.resolve_thresholds(NAMES, stored, 0.2)
    assert values == dict.fromkeys(NAMES, 0.2) and set(sources.values()) == {"tier"}
    assert ml.read_thresholds(tmp_path / "none", NAMES) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{", "not valid JSON"),
        ('{"thresholds": [0.5]}', "expected"),
        ('{"thresholds": {"bored": 0.5}}', "labels the model lacks: bored"),
        ('{"thresholds": {"angry": 1.5}}', "in \\[0, 1\\]"),
        ('{"thresholds": {"angry": true}}', "in \\[0, 1\\]"),
    ],
)
def test_a_broken_thresholds_file_is_refused(tmp_path: Path, doc: str, message: str) -> None:
    (tmp_path / ml.THRESHOLDS_FILE).write_text(doc)
    with pytest.raises(ValueError, match=message):
        ml.read_thresholds(tmp_path, NAMES)


def test_a_bad_tier_option_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks: bored"):
        ml.resolve_thresholds(NAMES, None, {"bored": 0.5})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ml.resolve_thresholds(NAMES, None, -0.1)


def test_label_set_answer_keeps_labels_at_or_above_their_threshold() -> None:
    probs = {"angry": 0.30, "hopeful": 0.62, "worried": 0.91}
    thresholds = {"angry": 0.30, "hopeful": 0.70, "worried": 0.50}
    sources = dict.fromkeys(NAMES, "thresholds.json")
    label, confidence, out = ml.label_set_answer(probs, thresholds, sources)
    assert out["labels"] == ["worried", "angry"]  # most probable first; 0.30 >= 0.30 kept
    assert label == "angry;worried"  # sorted, joined: one comparable value
    assert confidence == pytest.approx(0.30 * (1 - 0.62) * 0.91)
    assert out["thresholds"] == thresholds and out["thresholds_from"] == "thresholds.json"
    assert out["multi_label"] is True and "no_label" not in out


def test_no_label_over_threshold_is_an_empty_set_not_a_top_1() -> None:
    probs = {"angry": 0.10, "hopeful": 0.40, "worried": 0.20}
    label, confidence, out = ml.label_set_answer(
        probs, dict.fromkeys(NAMES, 0.5), dict.fromkeys(NAMES, "default")
    )
    assert label is None and out["labels"] == []
    assert out["no_label"].startswith(ml.NO_LABEL) and "hopeful" in out["no_label"]
    assert confidence == pytest.approx(0.9 * 0.6 * 0.8)


def test_label_column_round_trip_and_names() -> None:
    assert ml.join_labels(["worried", "angry"]) == "angry;worried"
    assert ml.join_labels([]) is None
    assert ml.split_labels("angry;worried") == ["angry", "worried"]
    assert ml.split_labels(None) == ml.split_labels("") == []
    with pytest.raises(ValueError, match="rename them"):
        ml.check_label_names(["a;b", "c"], where="tier t")
    assert ml.is_multi_label({"problem_type": ml.PROBLEM_TYPE})
    assert not ml.is_multi_label({"problem_type": "single_label_classification"})
