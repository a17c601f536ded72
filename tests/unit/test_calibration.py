"""Temperature scaling (workers.calibration) and calibration error (fleet.reporting.scoring):
a temperature planted in sampled labels is recovered, a stored temperature is applied by
the sequence_classify adapter, a folder without one says so, and ECE by table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fleet.reporting.scoring import expected_calibration_error, reliability_bins
from workers import calibration
from workers.calibration import (
    Calibration,
    fit_temperature,
    mean_nll,
    read_calibration,
    softmax,
    write_calibration,
)


def _sampled(t_true: float, n: int, classes: int, seed: int) -> tuple[list[list[float]], list[int]]:
    """Logits and labels drawn from softmax(logits / t_true): a model whose right temperature is t_true."""
    rng = random.Random(seed)
    logits = [[rng.gauss(0, 4) for _ in range(classes)] for _ in range(n)]
    gold = [rng.choices(range(classes), weights=softmax(row, t_true))[0] for row in logits]
    return logits, gold


@pytest.mark.parametrize("t_true", [0.5, 2.0, 3.0])
def test_fit_recovers_a_planted_temperature(t_true: float) -> None:
    logits, gold = _sampled(t_true, 3000, 3, seed=7)
    t = fit_temperature(logits, gold)
    assert t == pytest.approx(t_true, rel=0.1)
    # It is the NLL minimum: nudging T either way costs likelihood.
    assert mean_nll(logits, gold, t) < mean_nll(logits, gold, t * 1.2)
    assert mean_nll(logits, gold, t) < mean_nll(logits, gold, t / 1.2)


def test_fit_rejects_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature([], [])
    with pytest.raises(ValueError, match="same number"):
        fit_temperature([[1.0, 2.0], [1.0]], [0, 0])
    with pytest.raises(ValueError, match="gold class ids"):
        fit_temperature([[1.0, 2.0]], [2])


def test_file_round_trip_and_broken_files(tmp_path: Path) -> None:
    assert read_calibration(tmp_path) is None
    write_calibration(tmp_path, Calibration(temperature=2.5, fitted_on="split", n=10))
    cal = read_calibration(tmp_path)
    assert cal is not None and cal.temperature == 2.5 and cal.n == 10
    (tmp_path / calibration.CALIBRATION_FILE).write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="positive number"):
        read_calibration(tmp_path)
    (tmp_path / calibration.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_calibration(tmp_path)


@pytest.mark.parametrize(
    ("conf", "correct", "ece"),
    [
        ([], [], 0.0),
        ([0.95, 0.95], [True, True], 0.05),  # one bin: |1.0 - 0.95|
        ([0.95, 0.95], [True, False], 0.45),  # |0.5 - 0.95|
        ([0.15, 0.95], [False, True], (0.15 + 0.05) / 2),  # two bins, half the items each
        ([0.0, 1.0], [False, True], 0.0),  # the edges land in the first and last bin
    ],
)
def test_ece_by_table(conf: list[float], correct: list[bool], ece: float) -> None:
    assert expected_calibration_error(conf, correct) == pytest.approx(ece)


def test_reliability_bins_cover_the_unit_interval() -> None:
    bins = reliability_bins([0.05, 0.55, 0.56, 1.0], [False, True, False, True])
    assert [b["n"] for b in bins] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert bins[5]["accuracy"] == 0.5 and bins[5]["confidence"] == pytest.approx(0.555)
    with pytest.raises(ValueError):
        reliability_bins([0.5], [])


def test_adapter_applies_the_stored_temperature(tmp_path: Path) -> None:
    """A model with a known temperature: probabilities are softmax(logits / T), the label is
    unchanged, and the result says it is calibrated; without the file it says it is not."""
    import torch

    from config.taskconfig import TierSpec
    from tests.support import build_tiny_classifier
    from workers.adapters.base import Prediction, Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter

    folder = build_tiny_classifier(tmp_path / "tiny", labels=["a", "b", "c"], seed=3)
    source = Source(
        1, "conversation", "c1", {"messages": [{"role": "user", "content": "hi there"}]}
    )

    def run() -> tuple[Prediction, list[float]]:
        adapter = SequenceClassifyAdapter()
        adapter.load(TierSpec(name="t", path=str(folder)), str(folder), "cpu")
        prepared = adapter.prepare(source)
        [pred] = adapter.predict([prepared])
        assert isinstance(pred, Prediction)
        with torch.inference_mode():
            ids = torch.tensor(prepared.payload.ids)  # one window: the whole short conversation
            logits = adapter.model(input_ids=ids).logits.float()[0].tolist()
        return pred, logits

    raw, logits = run()
    assert raw.output is not None and raw.output["calibrated"] is False
    assert raw.confidence == pytest.approx(max(softmax(logits)), abs=1e-5)
    write_calibration(folder, Calibration(temperature=4.0))
    scaled, _ = run()
    assert scaled.output is not None
    assert (scaled.output["calibrated"], scaled.output["temperature"]) == (True, 4.0)
    want = softmax(logits, 4.0)
    assert scaled.label == raw.label
    assert scaled.confidence == pytest.approx(max(want), abs=1e-5)
    assert scaled.scores == pytest.approx(dict(zip("abc", want, strict=True)), abs=1e-5)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_binary_fit_recovers_a_planted_temperature(t_true: float) -> None:
    """Multi-label: labels drawn from sigmoid(z / T) give back T from their binary NLL."""
    import math

    rng = random.Random(1)
    logits = [[rng.gauss(0, 4) for _ in range(3)] for _ in range(3000)]
    targets = [[int(rng.random() < 1 / (1 + math.exp(-z / t_true))) for z in row] for row in logits]
    cal = calibration.calibrate_binary(logits, targets, fitted_on="planted")
    assert cal.temperature == pytest.approx(t_true, rel=0.1)
    assert cal.nll_after <= cal.nll_before and cal.method == calibration.SIGMOID_METHOD
    assert calibration.mean_binary_nll([[0.0]], [[1]], 1.0) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="at least one held-out item"):
        calibration.calibrate_binary([], [])
