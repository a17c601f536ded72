"""The review strategies and Label Studio parsing as pure functions (table tests)."""

from __future__ import annotations

import pytest

from fleet.review import labelstudio as ls
from fleet.review import strategies as st

C = st.Candidate
CANDS = [
    C(1, "a", {"a": 0.9, "b": 0.1}),
    C(2, "a", {"a": 0.5, "b": 0.45, "c": 0.05}),
    C(3, "b", {"b": 0.4, "a": 0.35, "c": 0.25}),
    C(4, "c", {"c": 0.6, "a": 0.39}, other_label="a"),
    C(5, "a", {}, confidence=0.7, other_label="a"),
]


@pytest.mark.parametrize(
    ("pick", "budget", "expected"),
    [
        (st.pick_uncertainty, 2, [3, 2]),  # 1 - max p: 0.6, 0.5
        (st.pick_margin, 2, [2, 3]),  # p1 - p2: 0.05, 0.05 (ties by id)
        (st.pick_disagreement, 5, [4]),  # only item 4's two answers differ
        (st.pick_uncertainty, 0, []),
    ],
)
def test_picks(pick, budget, expected):
    assert pick(CANDS, budget) == expected


def test_top_two_uses_confidence_without_scores():
    assert st.top_two(CANDS[4]) == (0.7, 0.0)


def test_random_is_seeded():
    assert st.pick_random(CANDS, 3, seed=1) == st.pick_random(CANDS, 3, seed=1)
    assert len(st.pick_random(CANDS, 10)) == 5


def test_diverse_takes_one_per_cluster():
    # two tight groups of near-duplicates: uncertainty would take both from group one
    cands = [C(i, "a", {"a": 0.5 + i / 100}) for i in range(6)]
    vectors = {0: [1, 0], 1: [1, 0.01], 2: [1, 0.02], 3: [0, 1], 4: [0.01, 1], 5: [0.02, 1]}
    picked = st.pick_diverse(cands, 2, embed=lambda ids: [vectors[i] for i in ids], seed=0)
    assert st.pick_uncertainty(cands, 2) == [0, 1]
    assert sorted(picked) == [0, 3]


@pytest.mark.parametrize(
    ("annotations", "label", "problem"),
    [
        (
            [{"result": [{"type": "choices", "from_name": "label", "value": {"choices": ["x"]}}]}],
            "x",
            None,
        ),
        (
            [{"was_cancelled": True, "result": [{"type": "choices", "value": {"choices": ["x"]}}]}],
            None,
            "no annotation",
        ),
        ([], None, "no annotation"),
        (
            [
                {"result": [{"type": "choices", "value": {"choices": ["old"]}}]},
                {"result": [{"type": "choices", "value": {"choices": ["new"]}}], "completed_by": 3},
            ],
            "new",
            None,
        ),
    ],
)
def test_read_export(annotations, label, problem):
    (r,) = ls.read_export(
        [{"id": 9, "data": {"fleet_external_id": "e"}, "annotations": annotations}]
    )
    assert r.label == label
    assert (r.problem or "").startswith(problem or "")


def test_read_export_refuses_a_non_list():
    with pytest.raises(ValueError, match="JSON list of tasks"):
        ls.read_export({"data": {}})
