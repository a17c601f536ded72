"""A classifier's label names, and whether they are the task's.

transformers keeps the names in config.json's `id2label`; a model trained
elsewhere often leaves it generic (`LABEL_0`, `LABEL_1`, ...) and ships the
names beside the weights instead, in one of:

    label_map.json / intent_labels.json
        {"label_to_id": {"billing": 0, "refund": 1}}
        {"id_to_label": {"0": "billing", "1": "refund"}}   (both keys: they must agree)
        {"labels": ["billing", "refund"]} or ["billing", "refund"]   (id = position)

`model_labels` takes config.json's names unless they are generic, else the
first of those files that exists. `check_labels` refuses a model whose label
set is not the task's: a worker must not write another task's labels, or
LABEL_3, as results.

Reads JSON only (no torch); the sequence_classify adapter calls it at load
and, for every tier of the ladder, before the first one loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LABEL_MAP_FILES = ("label_map.json", "intent_labels.json")
GENERIC = re.compile(r"^LABEL_\d+$")


class LabelMapError(ValueError):
    """A label map file is unreadable or inconsistent, or the model's labels are
    not the task's. The message names the file or the labels and what to do."""


def is_generic(id2label: Mapping[int, str]) -> bool:
    """Whether every name is transformers' placeholder LABEL_<i> (or there are none)."""
    return all(GENERIC.match(str(name)) for name in id2label.values())


def _ids(pairs: Iterable[tuple[Any, Any]], where: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, name in pairs:
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise LabelMapError(f"{where}: id {key!r} is not an integer") from None
        if not isinstance(name, str) or not name:
            raise LabelMapError(f"{where}: label for id {i} is {name!r}, not a name")
        if i in out:
            raise LabelMapError(f"{where}: id {i} is given twice")
        out[i] = name
    return out


def parse_label_map(doc: Any, *, where: str) -> dict[int, str]:
    """id -> label from a label map document (the shapes in the module docstring).

    Raises LabelMapError for another shape, ids that are not 0..n-1, a name
    given twice, or label_to_id and id_to_label that disagree."""
    maps: list[dict[int, str]] = []
    if isinstance(doc, list):
        maps.append(_ids(enumerate(doc), where))
    elif isinstance(doc, dict) and isinstance(doc.get("labels"), list):
        maps.append(_ids(enumerate(doc["labels"]), where))
    elif isinstance(doc, dict):
        if isinstance(doc.get("id_to_label"), dict):
            maps.append(_ids(doc["id_to_label"].items(), f"{where} id_to_label"))
        if isinstance(doc.get("label_to_id"), dict):
            pairs = ((i, name) for name, i in doc["label_to_id"].items())
            maps.append(_ids(pairs, f"{where} label_to_id"))
    if not maps:
        raise LabelMapError(
            f"{where}: expected {{'label_to_id': {{name: id}}}}, {{'id_to_label': {{id: name}}}} "
            "or a list of label names"
        )
    if len(maps) == 2 and maps[0] != maps[1]:
        raise LabelMapError(f"{where}: label_to_id and id_to_label disagree")
    id2label = maps[0]
    if sorted(id2label) != list(range(len(id2label))):
        raise LabelMapError(f"{where}: ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
    if len(set(id2label.values())) != len(id2label):
        raise LabelMapError(f"{where}: a label name is given twice")
    return id2label


def read_label_map(folder: Path) -> tuple[dict[int, str], str] | None:
    """(id -> label, file name) from the first label map file in `folder`, or None."""
    for name in LABEL_MAP_FILES:
        path = Path(folder) / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError) as e:
                raise LabelMapError(f"{path} is not readable JSON ({e}): fix or remove it") from e
            return parse_label_map(doc, where=str(path)), name
    return None


def model_labels(folder: Path, config_id2label: Mapping[int, str]) -> tuple[dict[int, str], str]:
    """(id -> label, where the names came from): config.json's names unless they
    are generic, else a shipped label map's (which must have as many labels as
    the model has outputs). Raises LabelMapError."""
    names = {int(i): str(n) for i, n in config_id2label.items()}
    if not is_generic(names):
        return names, "config.json"
    shipped = read_label_map(folder)
    if shipped is None:
        return names, "config.json"
    id2label, file = shipped
    if len(id2label) != len(names):
        raise LabelMapError(
            f"{Path(folder) / file} names {len(id2label)} labels but the model has "
            f"{len(names)} outputs: it belongs to another model"
        )
    return id2label, file


def check_labels(id2label: Mapping[int, str], task_labels: Iterable[str], *, where: str) -> None:
    """Raise LabelMapError unless the model's label set is the task's (any order).
    A task that declares no labels accepts any model."""
    wanted = set(task_labels)
    if not wanted:
        return
    have = set(id2label.values())
    if have == wanted:
        return
    missing, extra = sorted(wanted - have), sorted(have - wanted)
    hint = (
        "its config.json has only generic names (LABEL_0, ...): ship a label_map.json "
        "beside the weights"
        if is_generic(id2label)
        else "point the tier at a model trained for this task's labels, or change the task's labels"
    )
    raise LabelMapError(
        f"{where}: the model's labels are not the task's (missing {missing or 'none'}, "
        f"not in the task {extra or 'none'}); {hint}"
    )
