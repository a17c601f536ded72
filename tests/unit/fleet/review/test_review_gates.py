"""Promotion gates as pure decisions (table tests)."""

from __future__ import annotations

import pytest

from fleet.review.gates import GateLimits, decide, expected_calibration_error, share_shift

LIMITS = GateLimits(f1_margin=0.02, max_share_shift=0.15, max_ece=0.15, min_gold=20)


@pytest.mark.parametrize(
    ("current", "candidate", "n", "shifts", "ece", "failed"),
    [
        (0.80, 0.85, 100, {"a": 0.05}, 0.05, []),
        (0.80, 0.79, 100, {"a": 0.05}, 0.05, []),  # within the margin
        (0.80, 0.70, 100, {"a": 0.05}, 0.05, ["macro_f1"]),
        (0.80, 0.85, 100, {"a": -0.30, "b": 0.3}, 0.05, ["share_shift"]),
        (0.80, 0.85, 100, {}, 0.40, ["ece"]),
        (0.80, 0.85, 5, {}, 0.05, ["gold_size"]),
    ],
)
def test_decide(current, candidate, n, shifts, ece, failed):
    gates = decide(
        current_f1=current, candidate_f1=candidate, n_gold=n, shifts=shifts, ece=ece, limits=LIMITS
    )
    assert [g.name for g in gates if not g.passed] == failed


@pytest.mark.parametrize(
    ("conf", "correct", "expected"),
    [
        ([], [], 0.0),
        ([0.9, 0.9], [True, True], 0.1),
        ([0.55, 0.95], [True, False], (0.45 + 0.95) / 2),
    ],
)
def test_ece(conf, correct, expected):
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)


def test_share_shift():
    assert share_shift(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == {"a": -0.25, "b": 0.25}
