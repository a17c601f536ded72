"""The bundled sentiment model as `fleet models prepare` builds it, on ordinary text
written outside its files: emoji (MiniLM's vocabulary read every one as [UNK], so
"😢" was neutral), short review praise, voicemails and survey non-answers; and its
temperature fitted on the shipped calibration file, not on the training split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.data import data_path
from fleet.models.catalogue import BUNDLED, SENTIMENT
from fleet.models.finetune import METRICS_FILE
from fleet.models.folderpredict import predict
from fleet.models.labeled import load_labeled

pytestmark = pytest.mark.slow

# Written for this test: in none of sentiment.jsonl, sentiment_calibration.jsonl or
# the evaluation sets.
OUTSIDE = {
    "😊😊": "positive",
    "🤩": "positive",
    "😠": "negative",
    "😿": "negative",
    "🥺 my cat died this morning": "negative",
    "finally got the keys to our first flat 🏡🙌": "positive",
    "flight delayed 4 hours 🙄": "negative",
    "Amazing service, thank you": "positive",
    "nothing to add from me": "neutral",
    "hi it's Priya um ring me back when you can": "neutral",
}


@pytest.fixture(scope="module")
def sentiment_folder(bundled_models_dir: Path) -> Path:
    from fleet.models.prepare import prepare_bundled

    return prepare_bundled(bundled_models_dir, SENTIMENT, echo=lambda _: None)


def test_the_bundled_sentiment_model_reads_outside_text_and_emoji(sentiment_folder: Path) -> None:
    shipped = {
        ex.text
        for f in ("sentiment.jsonl", "sentiment_calibration.jsonl")
        for ex in load_labeled(data_path(f))
    }
    assert not {f"user: {t}" for t in OUTSIDE} & shipped
    got = predict(sentiment_folder, list(OUTSIDE))
    wrong = {t: g for t, g, want in zip(OUTSIDE, got, OUTSIDE.values(), strict=True) if g != want}
    assert not wrong, wrong


def test_its_temperature_is_fitted_on_the_shipped_calibration_file(
    sentiment_folder: Path,
) -> None:
    metrics = json.loads((sentiment_folder / METRICS_FILE).read_text())
    cal = metrics["calibration"]
    file = BUNDLED[SENTIMENT].calibration
    assert cal["calibration_data"] == file
    assert cal["calibration_set"]["n"] == len(load_labeled(data_path(file or "")))
    assert cal["calibration_set"]["ece_after"] <= cal["calibration_set"]["ece_before"]
    stored = json.loads((sentiment_folder / "calibration.json").read_text())
    assert stored["temperature"] == cal["temperature"] and file in stored["fitted_on"]
    assert metrics["emoji"] == "names"
