"""Labeled training data for `fleet train`: reading it, checking it, splitting it.

Three file shapes are accepted, so the labeled sets people already have work
without conversion:

* CSV with a header: `text` (or `message`), `label` (or `category`), and
  optionally `weight` (or `confidence`): the `message,category[,confidence]`
  files the older jobs produced;
* JSONL, one object per line, with the same keys; a line may instead carry a
  conversation (`messages`, as `fleet ingest conversations` reads them) and
  its label;
* a JSON document: a list of such objects (or `{"conversations": [...]}`).

Multi-label data (`fleet train --multi-label`, `load_labeled(..., multi_label=True)`)
gives each example a list of labels, possibly empty (the text has none of them):
a CSV `labels` column with `;`-separated names (`text,labels` / `"worried;hopeful"`),
or a JSON `"labels": ["worried", "hopeful"]` (a `;`-separated string is read
the same way). A `labels` column in a single-label file is refused, naming
`--multi-label`.

A conversation becomes text exactly as the serving adapter makes it
(`workers.adapters.text.conversation_text`), so the model trains on what it
will be shown. Every problem is reported with the file and line, and the
checks that need the whole set (one label only, a label set that differs
from the task's) run before any model is loaded: a bad file fails in a
second, not after ten minutes of training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.adapters.base import InputError
from workers.adapters.text import conversation_text

TEXT_KEYS = ("text", "message")
LABEL_KEYS = ("label", "category")
LABEL_SET_KEYS = ("labels",)
LABEL_SEPARATOR = ";"  # the `label` column of a multi-label result joins its labels with it
WEIGHT_KEYS = ("weight", "confidence")
# Conversation fields (as `fleet ingest conversations` reads them) allowed in JSON rows.
CONVERSATION_KEYS = ("messages", "external_id", "language", "meta")
MAX_TEXT_CHARS = 1_000_000


class TrainingDataError(ValueError):
    """Labeled data that cannot be trained on; the message says where and what to fix."""


@dataclass(frozen=True)
class Example:
    """One labeled text. `weight` scales its loss (1.0 = an ordinary example).

    Multi-label: `labels` is the example's label set (sorted, possibly empty) and
    `label` the same names joined with ";" ("" for none), so hashes and logs read it
    as one value; single-label examples have `labels` None."""

    text: str
    label: str
    weight: float = 1.0
    labels: tuple[str, ...] | None = None

    @classmethod
    def multi(cls, text: str, labels: Iterable[str], weight: float = 1.0) -> Example:
        """A multi-label example of `labels` (duplicates dropped, sorted)."""
        names = tuple(sorted(set(labels)))
        return cls(text, LABEL_SEPARATOR.join(names), weight, names)


def _pick(row: dict[str, Any], keys: Sequence[str], where: str) -> Any:
    found = [k for k in keys if k in row]
    if len(found) > 1:
        raise TrainingDataError(f"{where}: both {found[0]!r} and {found[1]!r} given; keep one")
    return row[found[0]] if found else None


def _weight(value: Any, where: str) -> float:
    if value is None or value == "":
        return 1.0
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise TrainingDataError(f"{where}: weight/confidence {value!r} is not a number") from None
    if not math.isfinite(w) or w <= 0:
        raise TrainingDataError(f"{where}: weight/confidence must be a positive number, got {w}")
    return w


def label_set(value: Any, where: str) -> tuple[str, ...]:
    """A multi-label row's labels: a JSON list of names, or one string of names
    separated by ";" ("" or [] for none); sorted, duplicates dropped. Raises
    TrainingDataError for anything else or an empty name in a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(LABEL_SEPARATOR)]
        return tuple(sorted({p for p in parts if p}))
    if isinstance(value, list):
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise TrainingDataError(f"{where}: 'labels' must be a list of non-empty label names")
        names = [v.strip() for v in value]
        if any(LABEL_SEPARATOR in n for n in names):
            raise TrainingDataError(
                f"{where}: a label name cannot hold {LABEL_SEPARATOR!r} (it joins a label set)"
            )
        return tuple(sorted(set(names)))
    raise TrainingDataError(
        f"{where}: 'labels' must be a list of names or one ';'-separated string, "
        f"got {type(value).__name__}"
    )


def example_from_row(row: dict[str, Any], where: str, *, multi_label: bool = False) -> Example:
    """One Example from a parsed CSV row or JSON object (`multi_label`: with a label set).

    Raises TrainingDataError naming `where` (file:line) for unknown columns,
    a missing or empty text, a missing label or a bad weight.
    """
    if multi_label:
        return _multi_example(row, where)
    if "labels" in row:
        raise TrainingDataError(
            f"{where}: a 'labels' column is a label set: train it with `fleet train "
            "--multi-label`, or give one 'label' per example"
        )
    allowed = {*TEXT_KEYS, *LABEL_KEYS, *WEIGHT_KEYS, *CONVERSATION_KEYS}
    unknown = sorted(k for k in row if k not in allowed)
    if unknown:
        raise TrainingDataError(
            f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; expected text (or "
            "message), label (or category), optionally weight (or confidence), or a "
            "conversation's messages"
        )
    label = _pick(row, LABEL_KEYS, where)
    if label is None and isinstance(row.get("meta"), dict):
        label = row["meta"].get("label")
    if not isinstance(label, str) or not label.strip():
        raise TrainingDataError(f"{where}: no label (a non-empty 'label' or 'category')")
    return Example(
        _example_text(row, where), label.strip(), _weight(_pick(row, WEIGHT_KEYS, where), where)
    )


def _example_text(row: dict[str, Any], where: str) -> str:
    text = _pick(row, TEXT_KEYS, where)
    if "messages" in row:
        if text is not None:
            raise TrainingDataError(f"{where}: give either text or messages, not both")
        try:
            text = conversation_text({"messages": row["messages"]}, max_chars=MAX_TEXT_CHARS)
        except InputError as e:
            raise TrainingDataError(f"{where}: {e}") from None
    if not isinstance(text, str) or not text.strip():
        raise TrainingDataError(f"{where}: empty text; every example needs some text to learn from")
    return text.strip()


def _multi_example(row: dict[str, Any], where: str) -> Example:
    allowed = {*TEXT_KEYS, *LABEL_SET_KEYS, *LABEL_KEYS, *WEIGHT_KEYS, *CONVERSATION_KEYS}
    unknown = sorted(k for k in row if k not in allowed)
    if unknown:
        raise TrainingDataError(
            f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; expected text (or "
            "message), labels (a list, or names separated by ';'), optionally weight (or "
            "confidence), or a conversation's messages"
        )
    given = [k for k in (*LABEL_SET_KEYS, *LABEL_KEYS) if k in row]
    if not given:
        raise TrainingDataError(
            f"{where}: no 'labels' (a list of label names, [] or '' when none applies)"
        )
    if len(given) > 1:
        raise TrainingDataError(f"{where}: both {given[0]!r} and {given[1]!r} given; keep one")
    return Example.multi(
        _example_text(row, where),
        label_set(row[given[0]], where),
        _weight(_pick(row, WEIGHT_KEYS, where), where),
    )


def _csv_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise TrainingDataError(f"{path}: empty CSV (expected a header: text,label[,weight])")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise TrainingDataError(f"{where}: more fields than the header names")
            if not any((v or "").strip() for v in row.values()):
                continue
            yield row, where


def _json_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{path}: not valid JSON ({e})") from None
        if isinstance(doc, dict) and isinstance(doc.get("conversations"), list):
            doc = doc["conversations"]
        if not isinstance(doc, list):
            raise TrainingDataError(f"{path}: expected a list of labeled objects")
        for i, row in enumerate(doc):
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path}: item {i} is not an object")
            yield row, f"{path}: item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise TrainingDataError(f"{where}: expected a JSON object")
        yield row, where


def load_labeled(path: str | Path, *, multi_label: bool = False) -> list[Example]:
    """Examples from a CSV, JSONL or JSON file (see the module docstring); with
    `multi_label`, each with its label set (`Example.labels`).

    Raises TrainingDataError for an unreadable file, an unknown extension, a
    bad row (with its line) or a file without examples.
    """
    p = Path(path)
    if not p.is_file():
        raise TrainingDataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        rows: Iterable[tuple[dict[str, Any], str]] = _csv_rows(p)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _json_rows(p)
    else:
        raise TrainingDataError(f"{p}: unknown file type {suffix!r}; use .csv, .jsonl or .json")
    try:
        examples = [example_from_row(row, where, multi_label=multi_label) for row, where in rows]
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{p}: not UTF-8 text ({e.reason})") from None
    if not examples:
        raise TrainingDataError(f"{p}: no examples")
    return examples


def check_labels(
    examples: Sequence[Example],
    task_labels: Sequence[str] | None,
    *,
    what: str = "the training data",
) -> list[str]:
    """The label list to train, in the task's order; raises TrainingDataError when unusable.

    A classifier needs two labels at least. When the task declares its labels,
    the data must use exactly that set: a missing label would never be
    predicted and an extra one would be served under a name nothing expects.
    """
    present = sorted({ex.label for ex in examples})
    if len(present) < 2:
        raise TrainingDataError(
            f"{what} has only one label ({present[0] if present else 'none'}): a classifier "
            "needs examples of two labels at least"
        )
    if not task_labels:
        return present
    missing = [lab for lab in task_labels if lab not in present]
    extra = [lab for lab in present if lab not in task_labels]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no examples of {', '.join(missing)}")
        if extra:
            parts.append(f"labels the task does not have: {', '.join(extra)}")
        raise TrainingDataError(
            f"{what}: the label set differs from the task's ({'; '.join(parts)}). Relabel the "
            f"data to {', '.join(task_labels)}, or change the task's labels in the task config"
        )
    return list(task_labels)


def split_examples(
    examples: Sequence[Example], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Stratified, deterministic train/validation split.

    Each label contributes `round(n * test_fraction)` of its examples to the
    held-out side (at least one when it has two or more, so every label is
    measured; never all of them, so every label is trained). The result
    depends only on the examples and the seed: labels are visited in sorted
    order with one seeded RNG.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        n_test = min(max(n_test, 1), len(group) - 1) if len(group) >= 2 else 0
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def class_weights(examples: Sequence[Example], labels: Sequence[str]) -> list[float]:
    """ "Balanced" class weights, n / (k * count_c), in `labels` order.

    The heuristic of King & Zeng (2001), as scikit-learn's
    `compute_class_weight("balanced")`: a class with half the average count
    weighs twice as much, so a rare label is not learned as noise.
    """
    counts = {lab: 0 for lab in labels}
    for ex in examples:
        counts[ex.label] += 1
    n, k = len(examples), len(labels)
    return [n / (k * counts[lab]) if counts[lab] else 0.0 for lab in labels]


def data_hash(examples: Sequence[Example]) -> str:
    """sha256 over the examples (text, label, weight), order included: the model card's data id."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.label, ex.weight], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
