"""Classification metrics, pure Python (no scikit-learn dependency)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any


def classification_report(
    gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and a confusion matrix.

    `confusion[gold][predicted]` counts items. A label with no predictions has
    precision 0 (and likewise recall/F1), the usual convention, so a model
    that never predicts a class is penalised in the macro average. Macro
    averages run over `labels` (default: every label seen in gold or
    predicted). A missing prediction (None) counts as wrong and appears in
    the confusion matrix under "(none)".
    """
    preds = [p if p is not None else "(none)" for p in predicted]
    if len(gold) != len(preds):
        raise ValueError(f"{len(gold)} gold labels but {len(preds)} predictions")
    if labels is None:
        labels = sorted(set(gold) | set(preds))
    labels = list(labels)
    names = labels + sorted((set(gold) | set(preds)) - set(labels))
    confusion: dict[str, dict[str, int]] = {g: {p: 0 for p in names} for g in names}
    for g, p in zip(gold, preds, strict=True):
        confusion[g][p] += 1
    per_label: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = confusion[lab][lab]
        pred_n = sum(confusion[g][lab] for g in names)
        gold_n = sum(confusion[lab].values())
        precision = tp / pred_n if pred_n else 0.0
        recall = tp / gold_n if gold_n else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_n}
    n = len(gold)
    correct = sum(1 for g, p in zip(gold, preds, strict=True) if g == p)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(m["f1"] for m in per_label.values()) / len(per_label) if per_label else 0.0,
        "per_label": per_label,
        "confusion": confusion,
    }


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def reliability_bins(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> list[dict[str, float]]:
    """Equal-width confidence bins over [0, 1] (the reliability diagram's bars).

    One dict per bin, lowest first: `lo`, `hi` (bin edges), `n` (items whose
    top confidence falls in (lo, hi]; 0 goes in the first bin), `confidence`
    (their mean confidence) and `accuracy` (share correct); both 0.0 for an
    empty bin. Raises ValueError for lists of different lengths or bins < 1.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    sums = [[0, 0.0, 0.0] for _ in range(bins)]
    for c, ok in zip(confidences, correct, strict=True):
        k = min(bins - 1, max(0, math.ceil(c * bins) - 1))
        sums[k][0] += 1
        sums[k][1] += c
        sums[k][2] += 1.0 if ok else 0.0
    return [
        {
            "lo": k / bins,
            "hi": (k + 1) / bins,
            "n": n,
            "confidence": conf / n if n else 0.0,
            "accuracy": acc / n if n else 0.0,
        }
        for k, (n, conf, acc) in enumerate(sums)
    ]


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """Expected calibration error (Naeini et al. 2015; as in Guo et al. 2017):
    sum over equal-width confidence bins of (bin size / n) x |accuracy - mean confidence|.

    `confidences`: the top-label confidence of each item in [0, 1]; `correct`:
    whether that label was right. 0.0 for no items.
    """
    n = len(confidences)
    if not n:
        return 0.0
    return sum(
        b["n"] / n * abs(b["accuracy"] - b["confidence"])
        for b in reliability_bins(confidences, correct, bins)
    )


def multilabel_report(
    gold: Sequence[Collection[str]],
    predicted: Sequence[Collection[str] | None],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Multi-label scores: micro and macro F1, per-label precision/recall/F1/support,
    subset accuracy and Hamming loss (as scikit-learn's `f1_score(average="micro" |
    "macro")`, `accuracy_score` and `hamming_loss` on indicator matrices).

    `gold` and `predicted`: one label set per item. A missing prediction (None: the
    item failed or has no result) counts as the empty set in the per-label counts
    and the Hamming loss, and as wrong in the subset accuracy (`no_prediction`
    counts them). Per label: precision = tp / (tp + fp), recall = tp / (tp + fn),
    0 when the denominator is 0 (a label never predicted has precision 0, as in
    `classification_report`). Micro sums tp, fp and fn over labels first; macro
    averages the per-label F1 over `labels` (default: every label seen). Hamming
    loss = wrong (item, label) decisions / (items x labels). `accuracy` repeats the
    subset accuracy, so code reading single-label reports finds it. Raises
    ValueError for lists of different lengths."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold label sets but {len(predicted)} predictions")
    golds = [set(g) for g in gold]
    preds = [set(p) if p is not None else None for p in predicted]
    seen = set().union(*golds, *(p for p in preds if p is not None))
    names = list(labels) if labels is not None else sorted(seen)
    names += sorted(seen - set(names))
    counts = {lab: [0, 0, 0] for lab in names}  # tp, fp, fn
    exact = wrong = 0
    for g, p in zip(golds, preds, strict=True):
        got = p or set()
        for lab in g & got:
            counts[lab][0] += 1
        for lab in got - g:
            counts[lab][1] += 1
        for lab in g - got:
            counts[lab][2] += 1
        wrong += len(g ^ got)
        exact += p is not None and g == p

    def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    per_label: dict[str, dict[str, float]] = {}
    for lab in names:
        tp, fp, fn = counts[lab]
        precision, recall, f1 = prf(tp, fp, fn)
        per_label[lab] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": tp + fn,
            "predicted": tp + fp,
        }
    micro = prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
    macro_over = list(labels) if labels is not None else names
    n = len(golds)
    subset = exact / n if n else 0.0
    return {
        "multi_label": True,
        "n": n,
        "micro_precision": micro[0],
        "micro_recall": micro[1],
        "micro_f1": micro[2],
        "macro_f1": sum(per_label[lab]["f1"] for lab in macro_over) / len(macro_over)
        if macro_over
        else 0.0,
        "subset_accuracy": subset,
        "accuracy": subset,
        "hamming_loss": wrong / (n * len(names)) if n and names else 0.0,
        "per_label": per_label,
        "no_prediction": sum(1 for p in preds if p is None),
        "empty_predicted": sum(1 for p in preds if p is not None and not p),
    }
