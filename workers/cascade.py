"""A cascade: the cheap model answers every item, a stronger task only those it is unsure of.

A task with `escalate_to = "<task>"` and `escalate_below = <confidence>` in its
config: each result whose (calibrated) confidence is under the threshold is
marked in its output (`escalated_to`, `escalate_below`) and gets an item on the
stronger task, created in the same transaction that stores the result (so a
worker killed at any point leaves either both or neither, and the unique
(task, source) constraint keeps it to one). The stronger answer becomes the
final label in the `fleet_latest_results` view; when the stronger task fails,
the cheap label stays and the view says why (migration 0009).

The threshold: `fleet calibrate --task T --target-escalation 0.2` picks the
confidence quantile that sends that share (the calibrated-threshold router of
RouteLLM, Ong et al. 2024, here fed the cheap model's own calibrated answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from config.taskconfig import TaskSpec


def should_escalate(spec: TaskSpec, label: str | None, confidence: float | None) -> bool:
    """True when `spec` cascades and this answer is under its threshold.

    An answer without a label or confidence (a failed item) is not escalated:
    the item failed, and says why."""
    if spec.escalate_to is None or label is None or confidence is None:
        return False
    return confidence < spec.escalate_below


def escalation_output(spec: TaskSpec) -> dict[str, Any]:
    """What an escalated result's `output` records: where it went and under which threshold."""
    return {"escalated_to": spec.escalate_to, "escalate_below": spec.escalate_below}


def threshold_for_share(confidences: Sequence[float], share: float) -> float:
    """The confidence threshold that escalates `share` (0-1) of items answered with
    `confidences`: items with confidence < threshold escalate.

    The threshold is placed midway between the k-th and (k+1)-th lowest
    confidence, k = round(share x n), so exactly k items fall under it (ties
    may move a few more or fewer). 0.0 escalates nothing, 1.0+ everything.
    Raises ValueError for a share outside [0, 1] or no confidences."""
    if not 0 <= share <= 1:
        raise ValueError(f"the escalation share must lie between 0 and 1, got {share}")
    if not confidences:
        raise ValueError("no confidences to pick a threshold from (run the task first)")
    ordered = sorted(confidences)
    k = round(share * len(ordered))
    if k == 0:
        return 0.0
    if k >= len(ordered):
        return min(1.0, ordered[-1]) + 1e-9
    return (ordered[k - 1] + ordered[k]) / 2
