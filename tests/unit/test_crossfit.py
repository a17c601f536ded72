"""The stratified folds cross-fitted calibration trains on (fleet.models.crossfit)."""

from __future__ import annotations

from collections import Counter

import pytest

from fleet.models.crossfit import stratified_folds
from fleet.models.labeled import Example, TrainingDataError


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{lab} {i}", lab) for lab, n in counts.items() for i in range(n)]


def test_folds_partition_the_examples_and_spread_every_label() -> None:
    exs = _examples({"a": 11, "b": 7, "c": 3})
    folds = stratified_folds(exs, 5, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(exs)))  # each once
    assert max(map(len, folds)) - min(map(len, folds)) <= 1  # balanced sizes
    for label, n in (("a", 11), ("b", 7)):
        per_fold = [sum(exs[i].label == label for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    # every fold's training side (the other folds) still holds every label
    for f in folds:
        rest = Counter(exs[i].label for g in folds if g is not f for i in g)
        assert set(rest) == {"a", "b", "c"}


def test_folds_are_deterministic_and_seeded() -> None:
    exs = _examples({"a": 20, "b": 20})
    assert stratified_folds(exs, 4, seed=1) == stratified_folds(exs, 4, seed=1)
    assert stratified_folds(exs, 4, seed=1) != stratified_folds(exs, 4, seed=2)


@pytest.mark.parametrize(
    ("counts", "k", "message"),
    [
        ({"a": 5, "b": 5}, 1, "at least 2 folds"),
        ({"a": 1, "b": 1}, 3, "cannot fill 3 folds"),
        ({"a": 5, "b": 1}, 2, "fewer than 2 examples"),
    ],
)
def test_folds_that_cannot_be_cut_say_why(counts: dict[str, int], k: int, message: str) -> None:
    with pytest.raises(TrainingDataError, match=message):
        stratified_folds(_examples(counts), k)


def test_fold_models_stop_after_the_served_best_epoch() -> None:
    """The fold models keep the served run's schedule (laid out over config.epochs) and
    stop at the end of its best epoch, not earlier and not later."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from fleet.models.classifier import stop_after_epochs

    callback = stop_after_epochs(2)
    for epoch, stops in ((1.0, False), (2.0, True)):
        control = TrainerControl()
        callback.on_epoch_end(None, SimpleNamespace(epoch=epoch), control)
        assert control.should_training_stop is stops
