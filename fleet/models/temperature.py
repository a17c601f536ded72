"""Fitting a trained classifier folder's temperature and measuring its calibration.

`fleet train` calls `calibrate_folder` after training: the folder's logits on
the held-out split fit one temperature (`workers.calibration.fit_temperature`,
Guo et al. 2017), written to `calibration.json` beside the weights, which the
workers apply when they load the folder. `calibration_scores` gives the
expected calibration error (10 equal-width bins) before and after, for the
metrics and the model card.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleet.models.labeled import Example
from fleet.reporting.scoring import expected_calibration_error
from workers.calibration import Calibration, calibrate, softmax, write_calibration


def folder_logits(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[float]], list[str]]:
    """Raw logits (one row of C floats per text, no temperature) of a classifier folder,
    and its label names in id order. CPU, no grad; `progress(done, total)` per batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows: list[list[float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            rows.extend(model(**enc).logits.float().tolist())
            if progress is not None:
                progress(len(rows), len(texts))
    return rows, names


def calibration_scores(
    logits: Sequence[Sequence[float]], gold: Sequence[int], temperature: float
) -> dict[str, float]:
    """ECE (10 bins) of softmax(logits) and of softmax(logits / temperature), with accuracy."""
    correct = [max(range(len(r)), key=r.__getitem__) == g for r, g in zip(logits, gold, strict=True)]
    raw = [max(softmax(r)) for r in logits]
    scaled = [max(softmax(r, temperature)) for r in logits]
    n = len(gold)
    return {
        "n": n,
        "accuracy": round(sum(correct) / n, 6) if n else 0.0,
        "ece_before": round(expected_calibration_error(raw, correct), 6),
        "ece_after": round(expected_calibration_error(scaled, correct), 6),
        "mean_confidence_before": round(sum(raw) / n, 6) if n else 0.0,
        "mean_confidence_after": round(sum(scaled) / n, 6) if n else 0.0,
    }


def calibrate_folder(
    model_dir: str | Path,
    held_out: Sequence[Example],
    *,
    fitted_on: str,
    test: Sequence[Example] | None = None,
    max_length: int = 128,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the folder's temperature on `held_out`, write calibration.json, and score it.

    Returns the Calibration and `{"validation": scores, "test": scores | None}`
    (`calibration_scores`; the validation side is where T was fitted, so its
    ECE after is optimistic; `test` is text the fit never saw). Raises
    ValueError for an empty `held_out` or labels the folder lacks.
    """
    texts = [ex.text for ex in held_out]
    logits, names = folder_logits(model_dir, texts, max_length=max_length)
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({ex.label for ex in held_out} - set(index))
    if missing:
        raise ValueError(f"held-out labels the model lacks: {', '.join(missing)}")
    gold = [index[ex.label] for ex in held_out]
    cal = calibrate(logits, gold, fitted_on=fitted_on)
    write_calibration(model_dir, cal)
    scores: dict[str, Any] = {
        "validation": calibration_scores(logits, gold, cal.temperature),
        "test": None,
    }
    if test:
        t_logits, _ = folder_logits(model_dir, [ex.text for ex in test], max_length=max_length)
        t_gold = [index[ex.label] for ex in test]
        scores["test"] = calibration_scores(t_logits, t_gold, cal.temperature)
    return cal, scores
