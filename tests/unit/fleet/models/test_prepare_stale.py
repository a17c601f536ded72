"""A bundled model folder built from an older training set is found stale (and
`prepare_bundled` retrains it) instead of being served after an upgrade."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from config.data import data_path
from config.taskconfig import load_tasks
from fleet.models.catalogue import BUNDLED, INTENT, SENTIMENT
from fleet.models.finetune import EMOJI_READING, METRICS_FILE
from fleet.models.labeled import data_hash, load_labeled
from fleet.models.prepare import bundled_is_stale
from fleet.models.training import served_reading


def _calibration_sha() -> str:
    return data_hash(load_labeled(data_path(BUNDLED[SENTIMENT].calibration or "")))


def _folder(tmp_path: Path, sha: str | None, calibration_sha: str | None = "shipped") -> Path:
    folder = tmp_path / SENTIMENT
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if sha is not None:
        cal = {} if calibration_sha is None else {"calibration_sha256": calibration_sha}
        if calibration_sha == "shipped":
            cal["calibration_sha256"] = _calibration_sha()
        record = {"data_sha256": sha, "calibration": cal, "emoji": EMOJI_READING}
        (folder / METRICS_FILE).write_text(json.dumps(record))
    return folder


def test_a_folder_trained_on_the_shipped_set_is_current(tmp_path: Path) -> None:
    bundled = BUNDLED[SENTIMENT]
    shipped = data_hash(load_labeled(data_path(bundled.data)))
    assert bundled_is_stale(_folder(tmp_path, shipped), bundled) is None


def test_a_sentiment_folder_calibrated_on_its_split_is_stale(tmp_path: Path) -> None:
    """The sentiment folder an older version built fitted its temperature on the
    training file's held-out split (harder than outside text: it under-confided);
    an upgrade refits it on the shipped calibration file by retraining."""
    bundled = BUNDLED[SENTIMENT]
    shipped = data_hash(load_labeled(data_path(bundled.data)))
    reason = bundled_is_stale(_folder(tmp_path, shipped, calibration_sha=None), bundled)
    assert reason is not None and "sentiment_calibration.jsonl" in reason
    other = tmp_path / "other"
    other.mkdir()
    reason = bundled_is_stale(_folder(other, shipped, calibration_sha="2" * 64), bundled)
    assert reason is not None and "another version of sentiment_calibration.jsonl" in reason


def test_a_folder_trained_on_another_version_is_stale_with_the_reason(tmp_path: Path) -> None:
    bundled = BUNDLED[SENTIMENT]
    reason = bundled_is_stale(_folder(tmp_path, "0" * 64), bundled)
    assert reason is not None
    assert "sentiment.jsonl" in reason and "000000000000" in reason


def test_a_folder_without_the_record_is_left_alone(tmp_path: Path) -> None:
    assert bundled_is_stale(_folder(tmp_path, None), BUNDLED[SENTIMENT]) is None


def _intent_folder(tmp_path: Path, composed: dict[str, object] | None) -> Path:
    bundled = BUNDLED[INTENT]
    folder = tmp_path / INTENT
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    record = {
        "data_sha256": data_hash(load_labeled(data_path(bundled.data))),
        "composed": composed,
        "emoji": EMOJI_READING,
    }
    (folder / METRICS_FILE).write_text(json.dumps(record))
    return folder


def test_an_intent_folder_trained_without_the_small_talk_compositions_is_stale(
    tmp_path: Path,
) -> None:
    """The intent folder an older version built (same intent.jsonl, no composed
    conversations) read small talk as requests: an upgrade retrains it."""
    reason = bundled_is_stale(_intent_folder(tmp_path, None), BUNDLED[INTENT])
    assert reason is not None and "smalltalk.jsonl" in reason


def test_an_intent_folder_composed_with_the_shipped_filler_is_current(tmp_path: Path) -> None:
    filler = data_path(BUNDLED[INTENT].filler or "")
    sha = hashlib.sha256(filler.read_bytes()).hexdigest()
    per = BUNDLED[INTENT].filler_per_example
    by_turn = (
        served_reading(load_tasks(None)["intent"], tmp_path / INTENT).window_by == "user_turns"
    )
    current = {"filler_sha256": sha, "per_example": per, "by_turn": by_turn}
    assert bundled_is_stale(_intent_folder(tmp_path, current), BUNDLED[INTENT]) is None
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    reason = bundled_is_stale(
        _intent_folder(fewer, {**current, "per_example": per + 1}), BUNDLED[INTENT]
    )
    assert reason is not None and "composes" in reason
    other = tmp_path / "other"
    other.mkdir()
    reason = bundled_is_stale(_intent_folder(other, {"filler_sha256": "1" * 64}), BUNDLED[INTENT])
    assert reason is not None and "another version of smalltalk.jsonl" in reason


def test_a_folder_trained_reading_emoji_as_unknown_is_stale(tmp_path: Path) -> None:
    """Folders built before emoji were read as their names saw [UNK] for every emoji
    in their training lines (worthiness 27, sentiment 16, the small talk 32): served
    now with names, they would read what they were not trained on."""
    bundled = BUNDLED[SENTIMENT]
    folder = _folder(tmp_path, data_hash(load_labeled(data_path(bundled.data))))
    record = json.loads((folder / METRICS_FILE).read_text())
    del record["emoji"]
    (folder / METRICS_FILE).write_text(json.dumps(record))
    reason = bundled_is_stale(folder, bundled)
    assert reason is not None and "emoji" in reason


def test_an_intent_folder_composed_for_another_reading_is_stale(tmp_path: Path) -> None:
    """A tier reading one user turn at a time is trained with every small-talk user
    line alone (`fleet.models.compose`, by_turn); a folder composed for the other
    reading (before that, or for packed windows) is retrained."""
    filler = data_path(BUNDLED[INTENT].filler or "")
    sha = hashlib.sha256(filler.read_bytes()).hexdigest()
    per = BUNDLED[INTENT].filler_per_example
    by_turn = (
        served_reading(load_tasks(None)["intent"], tmp_path / INTENT).window_by == "user_turns"
    )
    other = {"filler_sha256": sha, "per_example": per, "by_turn": not by_turn}
    reason = bundled_is_stale(_intent_folder(tmp_path, other), BUNDLED[INTENT])
    assert reason is not None and "small-talk turns alone" in reason
