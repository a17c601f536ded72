"""Promotion gates: pure decisions over measured figures (table-tested).

A candidate model replaces the current one only when every gate passes:

- macro_f1: candidate macro-F1 >= current macro-F1 - margin, both on the same
  confirmed labels and gold files;
- share_shift: on a label-stratified sample of stored items, no label's share
  of the candidate's answers differs from its share of the stored answers by
  more than max_share_shift (absolute);
- ece: the candidate's expected calibration error on the gold items (10 equal-
  width confidence bins, Guo et al. 2017, "On Calibration of Modern Neural
  Networks") is at most max_ece.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GateLimits:
    """Bounds: macro-F1 margin (absolute), per-label share shift (absolute), ECE."""

    f1_margin: float = 0.02
    max_share_shift: float = 0.15
    max_ece: float = 0.15
    min_gold: int = 20  # fewer gold items than this decide nothing


@dataclass(frozen=True)
class Gate:
    """One gate's verdict with the figure and the bound it was held to."""

    name: str
    passed: bool
    value: float
    limit: float
    detail: str


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10
) -> float:
    """sum over bins of |bin| / n x |accuracy(bin) - mean confidence(bin)|; 0.0 for no items."""
    n = len(confidences)
    if n == 0:
        return 0.0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            acc = sum(1 for i in members if correct[i]) / len(members)
            conf = sum(confidences[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def share_shift(before: Sequence[str | None], after: Sequence[str | None]) -> dict[str, float]:
    """{label: share in `after` - share in `before`} over every label seen in either."""
    cb, ca = Counter(before), Counter(after)
    nb, na = max(len(before), 1), max(len(after), 1)
    return {str(k): ca[k] / na - cb[k] / nb for k in sorted(set(cb) | set(ca), key=str)}


def decide(
    *,
    current_f1: float,
    candidate_f1: float,
    n_gold: int,
    shifts: dict[str, float],
    ece: float,
    limits: GateLimits,
) -> list[Gate]:
    """Every gate's verdict, in order (gold size, macro-F1, share shift, ECE)."""
    worst = max(shifts.items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    return [
        Gate(
            "gold_size",
            n_gold >= limits.min_gold,
            float(n_gold),
            float(limits.min_gold),
            f"{n_gold} confirmed/gold items scored (at least {limits.min_gold} needed)",
        ),
        Gate(
            "macro_f1",
            candidate_f1 >= current_f1 - limits.f1_margin,
            candidate_f1 - current_f1,
            -limits.f1_margin,
            f"candidate {candidate_f1:.3f} vs current {current_f1:.3f} "
            f"(may be at most {limits.f1_margin:.3f} worse)",
        ),
        Gate(
            "share_shift",
            abs(worst[1]) <= limits.max_share_shift,
            abs(worst[1]),
            limits.max_share_shift,
            f"largest label share change {worst[1]:+.3f} ({worst[0]})",
        ),
        Gate(
            "ece",
            ece <= limits.max_ece,
            ece,
            limits.max_ece,
            f"candidate expected calibration error {ece:.3f}",
        ),
    ]
