"""A sequence_classify result keeps every label's probability (up to 32 labels,
or the task's `top_k`), says when it keeps fewer, and a bad `top_k` is a
configuration error. A real (tiny, random) BERT classifier with MiniLM's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.taskconfig import ConfigError, TierSpec, parse_tasks
from tests.support import build_tiny_classifier
from workers.adapters import make_adapter
from workers.adapters.base import Prediction, Source
from workers.adapters.sequence_classify import scores_kept


@pytest.mark.parametrize(
    ("n_labels", "top_k", "kept"),
    [
        (2, None, 2),
        (8, None, 8),
        (32, None, 32),
        (40, None, 32),
        (40, 40, 40),
        (8, 3, 3),
        (3, 5, 3),
    ],
)
def test_scores_kept(n_labels, top_k, kept):
    assert scores_kept(n_labels, top_k) == kept


def _task(**extra):
    return {
        "t": {"kind": "sequence_classify", "ladder": [{"path": "m"}], **extra},
    }


@pytest.mark.parametrize("bad", [0, -1, 2.5, "all", True])
def test_a_bad_top_k_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="top_k"):
        parse_tasks({"tasks": _task(top_k=bad)})


def test_top_k_is_only_for_sequence_classify():
    with pytest.raises(ConfigError, match="top_k"):
        parse_tasks({"tasks": {"t": {"kind": "fake", "top_k": 3, "ladder": [{"path": "m"}]}}})


def _predict(folder: Path, labels: list[str], **extra) -> Prediction:
    build_tiny_classifier(folder, labels=labels)
    spec = parse_tasks({"tasks": _task(**extra)})["t"]
    adapter = make_adapter(spec, max_chars=10_000, audio_root=Path("/"))
    adapter.load(TierSpec(name="m", path=str(folder)), str(folder), "cpu")
    source = Source(1, "conversation", "c1", {"messages": [{"role": "user", "content": "hi"}]})
    (pred,) = adapter.predict([adapter.prepare(source)])
    assert isinstance(pred, Prediction)
    return pred


def test_every_label_of_an_eight_label_model_has_its_probability(tmp_path):
    labels = [f"label{i}" for i in range(8)]
    pred = _predict(tmp_path / "m8", labels)
    assert pred.scores is not None and sorted(pred.scores) == labels
    assert abs(sum(pred.scores.values()) - 1.0) < 1e-4
    assert pred.output is not None and "scores_kept" not in pred.output  # nothing left out


def test_a_forty_label_model_keeps_32_and_says_so(tmp_path):
    pred = _predict(tmp_path / "m40", [f"l{i}" for i in range(40)])
    assert pred.scores is not None and len(pred.scores) == 32
    assert pred.output is not None
    assert (pred.output["scores_kept"], pred.output["labels"]) == (32, 40)
    assert pred.label == max(pred.scores, key=pred.scores.__getitem__)


def test_top_k_on_the_task(tmp_path):
    pred = _predict(tmp_path / "m8k", [f"label{i}" for i in range(8)], top_k=3)
    assert pred.scores is not None and len(pred.scores) == 3
    assert pred.output is not None
    assert (pred.output["scores_kept"], pred.output["labels"]) == (3, 8)
