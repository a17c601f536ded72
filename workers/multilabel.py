"""Several labels at once: what a multi-label classifier's answer is.

A model folder whose `config.json` says `problem_type = "multi_label_classification"`
(transformers' own key; `fleet train --multi-label` writes it) gives every label
its own yes/no: the logits go through a sigmoid (after the folder's temperature,
`workers.calibration`), and a label is kept when its probability is at or above
its threshold. The thresholds come, per label, from

    the tier option `thresholds` (a number for every label, or a table per label)
      > thresholds.json beside the weights (fitted by `fleet train` on its held-out
        split to maximise each label's F1: `fleet.models.multilabel.fit_thresholds`)
      > 0.5

The result (`label_set_prediction`):

* `label`: the kept labels joined with ";" in sorted order (one string an
  application can compare or group by), NULL when none is kept: an empty set is
  said so, never a forced top-1;
* `output.labels`: the kept labels, most probable first; `output.thresholds`:
  the threshold used for every label and `output.thresholds_from` where each came
  from; `output.no_label` says why the set is empty;
* `scores`: every label's probability (not only the kept ones);
* `confidence`: the probability that exactly this set is right when the labels
  are independent: the product of p over kept labels and 1 - p over the others
  (so `fleet eval`'s ECE, which scores the set as a whole, measures it).

Pure Python: no torch at import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROBLEM_TYPE = "multi_label_classification"
THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5
SEPARATOR = ";"
NO_LABEL = "no label at or above its threshold"


def is_multi_label(config: Any) -> bool:
    """True when a transformers config (or its dict) declares multi-label classification."""
    value = (
        config.get("problem_type")
        if isinstance(config, dict)
        else getattr(config, "problem_type", None)
    )
    return value == PROBLEM_TYPE


def check_label_names(names: Sequence[str], *, where: str) -> None:
    """Raise ValueError when a label name cannot be part of a joined label set
    (it holds the separator ";", or is empty)."""
    bad = [n for n in names if not n or SEPARATOR in n]
    if bad:
        raise ValueError(
            f"{where}: label names {bad} cannot be served as a label set (a multi-label "
            f"result joins its labels with {SEPARATOR!r}); rename them"
        )


def join_labels(labels: Sequence[str]) -> str | None:
    """The `label` column of a label set: sorted names joined with ";", None when empty."""
    return SEPARATOR.join(sorted(labels)) or None


def split_labels(value: str | None) -> list[str]:
    """The label set of a stored `label` column (`join_labels` backwards); [] for None or ''."""
    if not value:
        return []
    return sorted({part.strip() for part in value.split(SEPARATOR) if part.strip()})


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: a threshold must be a number in [0, 1], got {value!r}")
    t = float(value)
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise ValueError(f"{where}: a threshold must be a number in [0, 1], got {value!r}")
    return t


def read_thresholds(folder: str | Path, names: Sequence[str]) -> dict[str, float] | None:
    """The per-label thresholds stored beside the weights (thresholds.json
    `{"thresholds": {label: t}, ...}`), or None when the folder has none.

    Raises ValueError for a file that is not such an object, a threshold outside
    [0, 1] or a label the model does not have (a broken file is fixed, not
    served around quietly)."""
    path = Path(folder) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); refit it with `fleet train`") from e
    table = raw.get("thresholds") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f'{path}: expected {{"thresholds": {{label: number}}}}')
    stray = sorted(set(table) - set(names))
    if stray:
        raise ValueError(f"{path}: thresholds for labels the model lacks: {', '.join(stray)}")
    return {str(k): _threshold(v, f"{path} {k}") for k, v in table.items()}


def resolve_thresholds(
    names: Sequence[str], stored: Mapping[str, float] | None, option: Any
) -> tuple[dict[str, float], dict[str, str]]:
    """Each label's threshold and where it came from ("tier", "thresholds.json" or
    "default"), in `names` order. `option`: the tier option `thresholds` (None, a
    number for every label, or a table label -> number). Raises ValueError for a
    value outside [0, 1] or a table naming a label the model lacks."""
    per_label: dict[str, float] = {}
    if isinstance(option, Mapping):
        stray = sorted(set(option) - set(names))
        if stray:
            raise ValueError(
                f"tier option thresholds names labels the model lacks: {', '.join(stray)}; "
                f"it has: {', '.join(names)}"
            )
        per_label = {
            str(k): _threshold(v, f"tier option thresholds.{k}") for k, v in option.items()
        }
    elif option is not None:
        every = _threshold(option, "tier option thresholds")
        per_label = dict.fromkeys(names, every)
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for name in names:
        if name in per_label:
            values[name], sources[name] = per_label[name], "tier"
        elif stored and name in stored:
            values[name], sources[name] = float(stored[name]), THRESHOLDS_FILE
        else:
            values[name], sources[name] = DEFAULT_THRESHOLD, "default"
    return values, sources


def kept_labels(probs: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """Labels whose probability is at or above their threshold, most probable first
    (ties by name)."""
    kept = [n for n, p in probs.items() if p >= thresholds[n]]
    return sorted(kept, key=lambda n: (-probs[n], n))


def set_probability(probs: Mapping[str, float], kept: Sequence[str]) -> float:
    """P(exactly the set `kept`) for independent labels: prod p (kept) x prod 1 - p (others)."""
    chosen = set(kept)
    out = 1.0
    for name, p in probs.items():
        out *= p if name in chosen else 1.0 - p
    return out


def label_set_answer(
    probs: Mapping[str, float], thresholds: Mapping[str, float], sources: Mapping[str, str]
) -> tuple[str | None, float, dict[str, Any]]:
    """(label column, confidence, output keys) of one item's label probabilities (see
    the module docstring)."""
    kept = kept_labels(probs, thresholds)
    output: dict[str, Any] = {
        "multi_label": True,
        "labels": kept,
        "thresholds": {n: round(float(t), 6) for n, t in thresholds.items()},
        "thresholds_from": _sources_summary(sources),
    }
    if not kept:
        best = max(probs, key=lambda n: probs[n])
        output["no_label"] = (
            f"{NO_LABEL} (the most probable, {best}, has {probs[best]:.3f} "
            f"against {thresholds[best]:.3f})"
        )
    return join_labels(kept), set_probability(probs, kept), output


def _sources_summary(sources: Mapping[str, str]) -> str | dict[str, str]:
    """One word when every threshold came from the same place, else per label."""
    distinct = set(sources.values())
    return next(iter(distinct)) if len(distinct) == 1 else dict(sources)
