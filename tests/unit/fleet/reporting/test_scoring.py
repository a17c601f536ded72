"""Multi-label scores (fleet.reporting.scoring.multilabel_report) on an example computed
by hand, and against scikit-learn's definitions."""

from __future__ import annotations

import pytest

from fleet.reporting.scoring import multilabel_report

LABELS = ["a", "b", "c"]
GOLD = [{"a", "b"}, {"b"}, set(), {"a", "c"}]
PRED = [{"a"}, {"b", "c"}, set(), {"a", "b", "c"}]


def test_hand_computed_example() -> None:
    # a: tp 2 fp 0 fn 0 | b: tp 1 (item 2) fp 1 (item 4) fn 1 (item 1) | c: tp 1 fp 1 fn 0
    rep = multilabel_report(GOLD, PRED, LABELS)
    per = rep["per_label"]
    assert per["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "predicted": 2}
    assert (per["b"]["precision"], per["b"]["recall"], per["b"]["f1"]) == (0.5, 0.5, 0.5)
    assert per["c"]["precision"] == 0.5 and per["c"]["recall"] == 1.0
    assert per["c"]["f1"] == pytest.approx(2 / 3)
    # micro: tp 4, fp 2, fn 1 -> P 4/6, R 4/5, F1 8/11
    assert rep["micro_precision"] == pytest.approx(4 / 6)
    assert rep["micro_recall"] == pytest.approx(4 / 5)
    assert rep["micro_f1"] == pytest.approx(8 / 11)
    assert rep["macro_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    # only the empty item is exactly right; 3 wrong decisions of 4 x 3
    assert rep["subset_accuracy"] == rep["accuracy"] == 0.25
    assert rep["hamming_loss"] == 0.25
    assert rep["n"] == 4 and rep["empty_predicted"] == 1 and rep["no_prediction"] == 0


def test_agrees_with_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    from sklearn.preprocessing import MultiLabelBinarizer

    mlb = MultiLabelBinarizer(classes=LABELS)
    y, p = mlb.fit_transform(GOLD), mlb.transform(PRED)
    rep = multilabel_report(GOLD, PRED, LABELS)
    assert rep["micro_f1"] == pytest.approx(sk.f1_score(y, p, average="micro"))
    assert rep["macro_f1"] == pytest.approx(sk.f1_score(y, p, average="macro"))
    assert rep["subset_accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert rep["hamming_loss"] == pytest.approx(sk.hamming_loss(y, p))


def test_a_missing_answer_is_never_right() -> None:
    rep = multilabel_report([set(), {"a"}], [None, {"a"}], ["a"])
    assert rep["no_prediction"] == 1 and rep["subset_accuracy"] == 0.5
    assert rep["hamming_loss"] == 0.0  # counted as the empty set decision by decision
    with pytest.raises(ValueError, match="2 gold label sets but 1"):
        multilabel_report([set(), set()], [set()], ["a"])


def test_labels_outside_the_list_are_scored_but_not_averaged() -> None:
    rep = multilabel_report([{"a", "z"}], [{"a"}], ["a"])
    assert rep["per_label"]["z"]["recall"] == 0.0
    assert rep["macro_f1"] == 1.0  # over the given labels
