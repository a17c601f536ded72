"""Training and scoring multi-label classifiers (`fleet train --multi-label`).

The label sets are checked and split here; `fleet.models.finetune` trains the
model (binary cross-entropy, `fleet.models.trainer`), then this module reads the
trained folder's held-out logits once and fits, in order:

1. one temperature for the sigmoids (`workers.calibration.calibrate_binary`:
   the binary NLL of every label decision) -> calibration.json;
2. per label, the threshold maximising that label's F1 on the calibrated
   held-out probabilities (`fit_thresholds`) -> thresholds.json.

The workers read both when they load the folder (`workers.multilabel`). Windows
are pooled as served: per label, the highest window logit for the `max` and
`salient` rules (sigmoid(max z / T) = max sigmoid(z / T), so the fit is exact),
the weighted mean of window probabilities for the others.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fleet.models.labeled import MAX_TEXT_CHARS, Example, TrainingDataError
from fleet.reporting.scoring import expected_calibration_error, multilabel_report
from workers.adapters.windowed import Reading, encode_windows, text_data
from workers.calibration import Calibration, calibrate_binary, write_calibration
from workers.multilabel import (
    DEFAULT_THRESHOLD,
    THRESHOLDS_FILE,
    kept_labels,
)
from workers.windows import pool_independent

MAX_POS_WEIGHT = 10.0


def check_label_sets(
    examples: Sequence[Example],
    task_labels: Sequence[str] | None,
    *,
    what: str = "the training data",
) -> list[str]:
    """The label list of a multi-label model, in the task's order (else sorted).

    Every label needs examples with it and examples without it (a label on no
    example, or on every one, cannot be learned); with the task's labels given,
    the data may name no other. Raises TrainingDataError saying what to fix."""
    if any(ex.labels is None for ex in examples):
        raise TrainingDataError(f"{what}: multi-label training needs a label set per example")
    present = Counter(name for ex in examples for name in ex.labels or ())
    if not present:
        raise TrainingDataError(f"{what}: no example has a label")
    names = list(task_labels) if task_labels else sorted(present)
    extra = sorted(set(present) - set(names))
    if extra:
        raise TrainingDataError(
            f"{what}: labels the task does not have: {', '.join(extra)}. Relabel the data to "
            f"{', '.join(names)}, or change the task's labels in the task config"
        )
    never = [n for n in names if not present[n]]
    always = [n for n in names if present[n] == len(examples)]
    if never or always:
        parts = ([f"no example has {', '.join(never)}"] if never else []) + (
            [f"every example has {', '.join(always)}"] if always else []
        )
        raise TrainingDataError(
            f"{what}: {'; '.join(parts)}: a label is learned from examples with it and "
            "without it; add some, or leave the label out of the task"
        )
    return names


def split_label_sets(
    examples: Sequence[Example], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/validation split stratified by each example's rarest label
    (examples without labels form their own group), so a rare label is held out
    in proportion too: `round(n * test_fraction)` of each group, at least one of a
    group of two or more, never all. Raises ValueError for a fraction outside (0, 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    freq = Counter(name for ex in examples for name in ex.labels or ())
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        key = min(ex.labels or (), key=lambda n: (freq[n], n), default="")
        groups[key].append(ex)
    rng = random.Random(seed)
    train: list[Example] = []
    valid: list[Example] = []
    for key in sorted(groups):
        group = list(groups[key])
        rng.shuffle(group)
        n = round(len(group) * test_fraction)
        n = min(max(n, 1), len(group) - 1) if len(group) >= 2 else 0
        valid.extend(group[:n])
        train.extend(group[n:])
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def positive_weights(examples: Sequence[Example], labels: Sequence[str]) -> list[float]:
    """Per label, negatives / positives (capped at 10): BCE's `pos_weight` for
    `--class-weights balanced`. It trades calibrated probabilities for recall on
    rare labels; the default for multi-label is none (the fitted thresholds
    handle imbalance)."""
    pos = Counter(name for ex in examples for name in ex.labels or ())
    n = len(examples)
    return [min((n - pos[lab]) / pos[lab], MAX_POS_WEIGHT) if pos[lab] else 1.0 for lab in labels]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def folder_logits(
    model_dir: str | Path,
    texts: Sequence[str],
    reading: Reading,
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[float]], list[str]]:
    """One row of pooled logits per text (every window read as served; see the module
    docstring for the pooling) and the folder's label names in id order. CPU, no grad."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out: list[list[float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            windows = [
                encode_windows(tokenizer, text_data(t), reading, max_chars=MAX_TEXT_CHARS)
                for t in texts[i : i + batch_size]
            ]
            enc = tokenizer.pad(
                {"input_ids": [ids for w in windows for ids in w.ids]}, return_tensors="pt"
            )
            rows = model(**enc).logits.float().tolist()
            at = 0
            for w in windows:
                mine = rows[at : at + len(w.ids)]
                at += len(w.ids)
                if len(mine) == 1 or reading.pooling in ("max", "salient", "margin", "latest"):
                    out.append([max(r[j] for r in mine) for j in range(len(names))])
                else:
                    probs = [[_sigmoid(z) for z in r] for r in mine]
                    pooled = pool_independent(probs, w.plan, reading.pooling).probs
                    out.append([math.log(max(p, 1e-12) / max(1 - p, 1e-12)) for p in pooled])
            if progress is not None:
                progress(len(out), len(texts))
    return out, names


def targets(examples: Sequence[Example], names: Sequence[str]) -> list[list[int]]:
    """0/1 rows (one per example, `names` order) of the examples' label sets."""
    return [[int(n in (ex.labels or ())) for n in names] for ex in examples]


def probabilities(logits: Sequence[Sequence[float]], temperature: float) -> list[list[float]]:
    """sigmoid(logit / T) of every cell."""
    return [[_sigmoid(z / temperature) for z in row] for row in logits]


def fit_thresholds(
    probs: Sequence[Sequence[float]], gold: Sequence[Sequence[int]], names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per label, the threshold maximising its F1 on held-out probabilities (the
    "SCut" strategy of Yang 2001, "A study of thresholding strategies for text
    categorization"; also Lipton et al. 2014 on F1-optimal thresholds).

    Every distinct probability is a candidate cut (kept: p >= cut); the best
    F1 wins (ties: the cut nearest 0.5), and the threshold is the midpoint between
    it and the next lower probability, so the held-out decisions are the same with
    a margin either side. A label with no positive held-out example keeps 0.5
    (`fitted: false`, its F1 cannot be measured). Returns
    {label: {"threshold", "f1", "f1_at_default", "positives", "fitted"}}."""
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        col = sorted(
            ((float(row[j]), int(g[j])) for row, g in zip(probs, gold, strict=True)), reverse=True
        )
        positives = sum(y for _, y in col)
        if not positives:
            out[name] = {
                "threshold": DEFAULT_THRESHOLD,
                "f1": None,
                "f1_at_default": None,
                "positives": 0,
                "fitted": False,
            }
            continue
        # sweep the distinct values from the top: at cut v, kept = items with p >= v
        best: tuple[float, float, float] | None = None  # (f1, -|v - 0.5|, v)
        cuts: list[float] = []
        kept = tp = 0
        k = 0
        while k < len(col):
            v = col[k][0]
            while k < len(col) and col[k][0] == v:
                kept += 1
                tp += col[k][1]
                k += 1
            cuts.append(v)
            key = (2 * tp / (kept + positives), -abs(v - 0.5), v)
            if best is None or key[:2] > best[:2]:
                best = key
        assert best is not None
        f1, _, cut = best
        lower = [c for c in cuts if c < cut]
        threshold = (cut + lower[0]) / 2 if lower else cut / 2
        tp_default = sum(1 for p, y in col if y and p >= DEFAULT_THRESHOLD)
        kept_default = sum(1 for p, _ in col if p >= DEFAULT_THRESHOLD)
        out[name] = {
            "threshold": round(threshold, 6),
            "f1": round(f1, 6),
            "f1_at_default": round(2 * tp_default / (kept_default + positives), 6),
            "positives": positives,
            "fitted": True,
        }
    return out


def write_thresholds(
    folder: str | Path, fitted: dict[str, dict[str, Any]], *, fitted_on: str
) -> Path:
    """thresholds.json: {"thresholds": {label: t}, "method", "fitted_on", "per_label"}."""
    path = Path(folder) / THRESHOLDS_FILE
    doc = {
        "thresholds": {name: f["threshold"] for name, f in fitted.items()},
        "method": "per-label F1 maximised on a held-out set (SCut)",
        "fitted_on": fitted_on,
        "per_label": fitted,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def label_ece(probs: Sequence[Sequence[float]], gold: Sequence[Sequence[int]]) -> float:
    """ECE (10 bins) over every (item, label) decision: confidence max(p, 1 - p),
    right when p >= 0.5 agrees with the gold 0/1."""
    conf: list[float] = []
    right: list[bool] = []
    for row, g in zip(probs, gold, strict=True):
        for p, y in zip(row, g, strict=True):
            conf.append(max(p, 1 - p))
            right.append((p >= 0.5) == bool(y))
    return expected_calibration_error(conf, right)


def predicted_sets(
    probs: Sequence[Sequence[float]], names: Sequence[str], thresholds: dict[str, float]
) -> list[list[str]]:
    """The label set of each probability row under `thresholds`."""
    return [kept_labels(dict(zip(names, row, strict=True)), thresholds) for row in probs]


def calibrate_and_fit(
    model_dir: str | Path,
    valid: Sequence[Example],
    *,
    reading: Reading,
    fitted_on: str,
    test: Sequence[Example] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Fit the folder's temperature and thresholds on `valid` (see the module
    docstring), write calibration.json and thresholds.json, and score the folder
    as served (calibrated, thresholded) on `valid` and `test`.

    Returns {"calibration": {...Calibration, "validation"/"test": ECE before/after},
    "thresholds": fit_thresholds(...), "validation": multilabel_report,
    "test": multilabel_report | None}."""

    def step(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    logits, names = folder_logits(
        model_dir, [ex.text for ex in valid], reading, progress=step("validation")
    )
    gold = targets(valid, names)
    cal: Calibration = calibrate_binary(logits, gold, fitted_on=fitted_on)
    write_calibration(model_dir, cal)
    probs = probabilities(logits, cal.temperature)
    fitted = fit_thresholds(probs, gold, names)
    write_thresholds(model_dir, fitted, fitted_on=fitted_on)
    thresholds = {n: f["threshold"] for n, f in fitted.items()}

    def scored(
        exs: Sequence[Example], z: list[list[float]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        g = targets(exs, names)
        p = probabilities(z, cal.temperature)
        rep = multilabel_report(
            [list(ex.labels or ()) for ex in exs], predicted_sets(p, names, thresholds), names
        )
        ece = {
            "n": len(exs),
            "ece_before": round(label_ece(probabilities(z, 1.0), g), 6),
            "ece_after": round(label_ece(p, g), 6),
        }
        return rep, ece

    val_rep, val_ece = scored(valid, logits)
    test_rep = test_ece = None
    if test:
        t_logits, _ = folder_logits(
            model_dir, [ex.text for ex in test], reading, progress=step("test")
        )
        test_rep, test_ece = scored(test, t_logits)
    return {
        "calibration": {**asdict(cal), "validation": val_ece, "test": test_ece},
        "thresholds": fitted,
        "validation": val_rep,
        "test": test_rep,
    }


def scores_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """What training_metrics.json keeps of a multilabel_report."""
    keys = (
        "n",
        "micro_f1",
        "macro_f1",
        "subset_accuracy",
        "accuracy",
        "hamming_loss",
        "per_label",
        "empty_predicted",
    )
    return {k: rep[k] for k in keys if k in rep}
