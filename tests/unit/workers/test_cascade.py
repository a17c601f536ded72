"""The cascade's pure decisions: which answers escalate, the threshold that sends a
share, and the task config checks of escalate_to / escalate_below."""

from __future__ import annotations

import pytest

from config.taskconfig import ConfigError, parse_tasks
from workers.cascade import escalation_output, should_escalate, threshold_for_share


def _tasks(**cheap: object) -> dict:
    ladder = [{"path": "m"}]
    return {
        "tasks": {
            "cheap": {"kind": "fake", "ladder": ladder, **cheap},
            "strong": {"kind": "fake", "ladder": ladder},
            "audio": {"kind": "fake", "source": "audio", "ladder": ladder},
        }
    }


@pytest.mark.parametrize(
    ("label", "confidence", "escalates"),
    [
        ("a", 0.59, True),
        ("a", 0.6, False),  # at the threshold: kept
        ("a", 0.99, False),
        (None, 0.1, False),  # no answer: the item failed, nothing to escalate
        ("a", None, False),
    ],
)
def test_should_escalate(label: str | None, confidence: float | None, escalates: bool) -> None:
    spec = parse_tasks(_tasks(escalate_to="strong", escalate_below=0.6))["cheap"]
    assert should_escalate(spec, label, confidence) is escalates
    assert escalation_output(spec) == {"escalated_to": "strong", "escalate_below": 0.6}


def test_a_task_without_a_cascade_never_escalates() -> None:
    spec = parse_tasks(_tasks())["cheap"]
    assert spec.escalate_to is None and not should_escalate(spec, "a", 0.01)


@pytest.mark.parametrize(
    ("confidences", "share", "below"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.2, 2),
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.0, 0),
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 1.0, 10),
        ([0.9, 0.3, 0.5, 0.7], 0.5, 2),  # order does not matter
        ([0.5] * 5, 0.4, 0),  # all tied: a threshold between equal values sends none
    ],
)
def test_threshold_sends_the_share(confidences: list[float], share: float, below: int) -> None:
    t = threshold_for_share(confidences, share)
    assert sum(c < t for c in confidences) == below


def test_threshold_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_for_share([0.5], 1.5)
    with pytest.raises(ValueError, match="run the task first"):
        threshold_for_share([], 0.2)


@pytest.mark.parametrize(
    ("cheap", "message"),
    [
        ({"escalate_to": "nope"}, "unknown task 'nope'"),
        ({"escalate_to": "cheap"}, "must be another task"),
        ({"escalate_to": "audio"}, "both tiers must read the same items"),
        ({"escalate_to": "strong", "escalate_below": 1.5}, "between 0 and 1"),
        ({"escalate_to": "strong", "escalate_below": "high"}, "between 0 and 1"),
    ],
)
def test_config_errors_name_the_task_and_the_fix(cheap: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tasks(_tasks(**cheap))
