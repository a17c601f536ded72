"""workers.labelmap: label names from config.json or a map shipped beside the
weights, and the refusal of a model whose labels are not the task's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from workers.labelmap import (
    LabelMapError,
    check_labels,
    is_generic,
    model_labels,
    parse_label_map,
    read_label_map,
)

GENERIC = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
NAMES = {0: "billing", 1: "refund", 2: "other"}


@pytest.mark.parametrize(
    ("id2label", "generic"),
    [(GENERIC, True), ({}, True), (NAMES, False), ({0: "LABEL_0", 1: "refund"}, False)],
)
def test_is_generic(id2label: dict[int, str], generic: bool) -> None:
    assert is_generic(id2label) is generic


@pytest.mark.parametrize(
    "doc",
    [
        {"label_to_id": {"billing": 0, "refund": 1, "other": 2}},
        {"id_to_label": {"0": "billing", "1": "refund", "2": "other"}},
        {
            "label_to_id": {"other": 2, "billing": 0, "refund": 1},
            "id_to_label": {"2": "other", "0": "billing", "1": "refund"},
        },
        {"labels": ["billing", "refund", "other"]},
        ["billing", "refund", "other"],
    ],
)
def test_parse_label_map_shapes(doc: Any) -> None:
    assert parse_label_map(doc, where="m") == NAMES


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"something": 1}, "expected"),
        ({"label_to_id": {"a": 0, "b": 2}}, "ids must be 0..1"),
        ({"id_to_label": {"0": "a", "x": "b"}}, "'x' is not an integer"),
        ({"id_to_label": {"0": "a", "1": ""}}, "not a name"),
        ({"label_to_id": {"a": 0}, "id_to_label": {"0": "b"}}, "disagree"),
        (["a", "a"], "given twice"),
    ],
)
def test_parse_label_map_refuses(doc: Any, message: str) -> None:
    with pytest.raises(LabelMapError, match=message):
        parse_label_map(doc, where="m")


def test_model_labels_prefers_real_config_names(tmp_path: Path) -> None:
    (tmp_path / "label_map.json").write_text(json.dumps(["x", "y", "z"]))
    assert model_labels(tmp_path, NAMES) == (NAMES, "config.json")


def test_model_labels_reads_a_shipped_map_for_generic_names(tmp_path: Path) -> None:
    assert model_labels(tmp_path, GENERIC) == (GENERIC, "config.json")  # no file: as is
    (tmp_path / "intent_labels.json").write_text(
        json.dumps({"label_to_id": {"billing": 0, "refund": 1, "other": 2}})
    )
    assert model_labels(tmp_path, GENERIC) == (NAMES, "intent_labels.json")
    (tmp_path / "label_map.json").write_text(json.dumps({"id_to_label": {"0": "a", "1": "b"}}))
    with pytest.raises(LabelMapError, match="names 2 labels but the model has 3 outputs"):
        model_labels(tmp_path, GENERIC)  # label_map.json is read first


def test_unreadable_map(tmp_path: Path) -> None:
    (tmp_path / "label_map.json").write_text("{not json")
    with pytest.raises(LabelMapError, match="not readable JSON"):
        read_label_map(tmp_path)


def test_check_labels() -> None:
    check_labels(NAMES, ["other", "billing", "refund"], where="t")  # any order
    check_labels(GENERIC, [], where="t")  # a task without labels takes any model
    with pytest.raises(LabelMapError, match=r"missing \['refund'\], not in the task \['cancel'\]"):
        check_labels({0: "billing", 1: "cancel", 2: "other"}, NAMES.values(), where="t")
    with pytest.raises(LabelMapError, match="ship a label_map.json"):
        check_labels(GENERIC, NAMES.values(), where="t")
