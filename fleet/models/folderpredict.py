"""Running a trained single-label folder over labeled text as served (every window,
pooled): the labels it gives and its scores against the examples' labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleet.models.labeled import MAX_TEXT_CHARS, Example
from fleet.models.modelcard import SERVED_MAX_LENGTH
from fleet.reporting.scoring import classification_report
from workers.adapters.windowed import Reading, encode_windows, text_data
from workers.windows import pool

READING_KEY = "fleet_reading"  # the model folder's config.json key holding the reading


def predict(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = SERVED_MAX_LENGTH,
    reading: Reading | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Label names the classifier folder predicts for `texts` (CPU, no grad), one per
    text, read as served: every window, pooled (`reading`, default: the one the folder
    was trained with, else `max_length` with the default pooling).

    `progress(done, total)` is called after each batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    if reading is None:
        saved = getattr(model.config, READING_KEY, None)
        reading = Reading.from_options(saved["max_length"], saved) if saved else Reading(max_length)
    id2label = model.config.id2label
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            windows = [
                encode_windows(tokenizer, text_data(t), reading, max_chars=MAX_TEXT_CHARS)
                for t in texts[i : i + batch_size]
            ]
            enc = tokenizer.pad(
                {"input_ids": [ids for w in windows for ids in w.ids]}, return_tensors="pt"
            )
            rows = model(**enc).logits.float().softmax(-1).tolist()
            at = 0
            for w in windows:
                pooled = pool(rows[at : at + len(w.ids)], w.plan, reading.pooling)
                at += len(w.ids)
                out.append(id2label[max(range(len(pooled.probs)), key=pooled.probs.__getitem__)])
            if progress is not None:
                progress(len(out), len(texts))
    return out


def evaluate(
    model_dir: str | Path,
    examples: Sequence[Example],
    *,
    reading: Reading | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Metrics of a saved classifier on `examples` read as served (`predict`)
    (`fleet.reporting.scoring.classification_report`)."""
    from transformers import AutoConfig

    labels = list(AutoConfig.from_pretrained(model_dir, local_files_only=True).id2label.values())
    predicted = predict(model_dir, [ex.text for ex in examples], reading=reading, progress=progress)
    return classification_report([ex.label for ex in examples], predicted, labels)


def scores_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """What training_metrics.json keeps of a classification_report."""
    return {k: rep[k] for k in ("n", "accuracy", "macro_f1", "per_label", "confusion")}
