"""The window builder and the pooling rules (workers.windows), as tables."""

from __future__ import annotations

import pytest

from workers.windows import (
    Segment,
    WindowPlan,
    build_turn_windows,
    build_windows,
    pool,
    pool_independent,
    window_weights,
)


def spans(plan: WindowPlan) -> list[list[tuple[int, int, int]]]:
    return [[(s.turn, s.start, s.end) for s in w.segments] for w in plan.windows]


@pytest.mark.parametrize(
    ("turns", "size", "overlap", "expected"),
    [
        # fits: one window, every turn whole
        ([("user", 3), ("assistant", 4)], 10, 2, [[(0, 0, 3), (1, 0, 4)]]),
        # turn boundaries respected: the turn that does not fit starts the next window
        (
            [("user", 6), ("assistant", 6), ("user", 3)],
            10,
            2,
            [[(0, 0, 6)], [(1, 0, 6), (2, 0, 3)]],
        ),
        # exactly full
        ([("user", 5), ("user", 5)], 10, 2, [[(0, 0, 5), (1, 0, 5)]]),
        # a single huge turn: pieces of `size`, each `size - overlap` after the last
        ([("user", 25)], 10, 3, [[(0, 0, 10)], [(0, 7, 17)], [(0, 14, 24)], [(0, 21, 25)]]),
        # a huge turn between short ones stands alone, the others keep their windows
        (
            [("user", 2), ("assistant", 12), ("user", 2)],
            10,
            0,
            [[(0, 0, 2)], [(1, 0, 10)], [(1, 10, 12)], [(2, 0, 2)]],
        ),
        # empty turns take no place
        (
            [("user", 0), ("assistant", 4), ("user", 0), ("user", 3)],
            10,
            2,
            [[(1, 0, 4), (3, 0, 3)]],
        ),
        # no overlap asked
        ([("user", 20)], 10, 0, [[(0, 0, 10)], [(0, 10, 20)]]),
    ],
)
def test_build_windows(turns, size, overlap, expected) -> None:
    plan = build_windows(turns, size=size, overlap=overlap)
    assert spans(plan) == expected
    assert all(w.tokens <= size for w in plan.windows)


def test_empty_turns_are_listed_and_roles_counted() -> None:
    plan = build_windows([("user", 0), ("assistant", 4), ("USER", 3), ("system", 2)], size=20)
    assert plan.empty_turns == (0,)
    assert plan.windows[0].user_tokens == 3
    assert plan.windows[0].turns == (1, 2, 3)


def test_every_token_of_a_long_turn_is_read() -> None:
    plan = build_windows([("user", 1000)], size=64, overlap=16)
    seen = set()
    for w in plan.windows:
        for s in w.segments:
            seen.update(range(s.start, s.end))
    assert seen == set(range(1000))


@pytest.mark.parametrize(
    ("max_windows", "kept", "skipped"),
    [
        (None, [0, 1, 2, 3, 4], []),
        (5, [0, 1, 2, 3, 4], []),
        (3, [0, 3, 4], [1, 2]),  # the first window and the latest
        (2, [0, 4], [1, 2, 3]),
        (1, [4], [0, 1, 2, 3]),  # one window: the latest, where the request is
    ],
)
def test_max_windows_keeps_first_and_latest(max_windows, kept, skipped) -> None:
    turns = [("user", 10)] * 5
    plan = build_windows(turns, size=10, max_windows=max_windows)
    assert [w.segments[0].turn for w in plan.windows] == kept
    assert [w.segments[0].turn for w in plan.skipped] == skipped
    assert plan.tokens_unread == 10 * len(skipped)
    assert [u["first_turn"] for u in plan.unread()] == skipped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "window size"),
        ({"size": 10, "overlap": 10}, "overlap"),
        ({"size": 10, "overlap": -1}, "overlap"),
        ({"size": 10, "max_windows": 0}, "max_windows"),
    ],
)
def test_bad_window_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_windows([("user", 5)], **kwargs)


def plan_of(*roles_tokens: tuple[str, int]) -> WindowPlan:
    """One window per (role, tokens)."""
    return build_windows(list(roles_tokens), size=max(n for _, n in roles_tokens))


A, B = [0.9, 0.1], [0.2, 0.8]


@pytest.mark.parametrize(
    ("rule", "rows", "roles", "label", "deciding"),
    [
        # one window: unchanged whatever the rule
        ("max", [A], [("user", 5)], 0, 0),
        ("recency", [B], [("user", 5)], 1, 0),
        # max: the most confident window wins
        ("max", [A, [0.4, 0.6], [0.45, 0.55]], [("user", 5)] * 3, 0, 0),
        # mean: the majority of windows
        ("mean", [A, B, B], [("user", 5)] * 3, 1, 1),
        # recency: the latest user window outweighs an earlier one
        ("recency", [A, B], [("user", 5), ("user", 5)], 1, 1),
        # recency: a trailing assistant-only window does not take the decision
        ("recency", [B, A], [("user", 5), ("assistant", 5)], 1, 0),
        # role: user windows outweigh assistant ones, wherever they are
        ("role", [A, B, A], [("assistant", 5), ("user", 5), ("assistant", 5)], 1, 1),
        ("mean", [A, B, A], [("assistant", 5), ("user", 5), ("assistant", 5)], 0, 0),
    ],
)
def test_pooling_rules(rule, rows, roles, label, deciding) -> None:
    pooled = pool(rows, plan_of(*roles), rule)
    assert max(range(2), key=pooled.probs.__getitem__) == label
    assert pooled.deciding == deciding
    assert sum(pooled.probs) == pytest.approx(1.0)


S, R, T = [0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.4, 0.3, 0.3]  # label 0: the background


@pytest.mark.parametrize(
    ("rows", "roles", "label", "deciding", "probs_from"),
    [
        # small talk first, the request last: the request's window decides, row and all
        ([S, S, R], [("user", 5)] * 3, 1, 2, 2),
        # the request first, small talk after it (an old thread): still the request
        ([R, S, S], [("user", 5)] * 3, 1, 0, 0),
        # the strongest non-background window wins over a weaker one
        ([[0.2, 0.3, 0.5], S, R], [("user", 5)] * 3, 1, 2, 2),
        # nothing but background over the threshold: the recency rule (label 0)
        ([S, T, S], [("user", 5)] * 3, 0, None, None),
    ],
)
def test_salient_pooling_looks_past_background(rows, roles, label, deciding, probs_from) -> None:
    pooled = pool(rows, plan_of(*roles), "salient", background=(0,))
    assert max(range(3), key=pooled.probs.__getitem__) == label
    if deciding is not None:
        assert pooled.deciding == deciding and pooled.probs == tuple(rows[probs_from])
    assert pooled == pool(rows, plan_of(*roles), "salient", background=(0,), threshold=0.5)


def test_salient_without_background_is_max() -> None:
    rows = [A, [0.4, 0.6], [0.45, 0.55]]
    plan = plan_of(*[("user", 5)] * 3)
    assert pool(rows, plan, "salient") == pool(rows, plan, "max")


def test_one_window_is_passed_through_exactly() -> None:
    row = [0.123456789, 0.876543211]
    assert pool([row], plan_of(("user", 3)), "recency").probs == tuple(row)


def test_recency_weights_decay_by_user_windows_after() -> None:
    plan = plan_of(("user", 4), ("assistant", 4), ("user", 4))
    assert window_weights(plan, "recency", decay=0.5, assistant_weight=0.1) == [
        0.5,
        pytest.approx(0.05),  # assistant_weight x one user window after it
        1.0,
    ]


def test_pool_rejects_a_row_count_that_differs_and_unknown_rules() -> None:
    plan = plan_of(("user", 3), ("user", 3))
    with pytest.raises(ValueError, match="rows"):
        pool([A], plan, "mean")
    with pytest.raises(ValueError, match="pooling"):
        pool([A, B], plan, "median")


def test_segment_length() -> None:
    assert Segment(0, 3, 10).length == 7


@pytest.mark.parametrize(
    ("turns", "room", "cap", "expected", "dropped"),
    [
        # everything fits: only long assistant turns are cut
        (
            [("user", 5), ("assistant", 30), ("user", 5)],
            100,
            10,
            [(0, 0, 5), (1, 0, 10), (2, 0, 5)],
            20,
        ),
        # over: assistant turns go first, oldest first
        (
            [("user", 5), ("assistant", 10), ("user", 5), ("assistant", 10), ("user", 5)],
            25,
            10,
            [(0, 0, 5), (2, 0, 5), (3, 0, 10), (4, 0, 5)],
            10,
        ),
        # then the oldest user turns; the latest user turn is never dropped
        (
            [("user", 10), ("user", 10), ("assistant", 5), ("user", 10)],
            20,
            10,
            [(1, 0, 10), (3, 0, 10)],
            15,
        ),
        # the latest user turn alone too long: its tail
        ([("user", 10), ("user", 50)], 20, 10, [(1, 30, 50)], 40),
        # assistant_cap 0: user turns only; empty turns cost nothing
        (
            [("user", 4), ("assistant", 9), ("user", 0), ("user", 3)],
            50,
            0,
            [(0, 0, 4), (3, 0, 3)],
            9,
        ),
    ],
)
def test_fit_turns(turns, room, cap, expected, dropped) -> None:
    from workers.windows import fit_turns

    segments, left_out = fit_turns(turns, room, assistant_cap=cap)
    assert [(s.turn, s.start, s.end) for s in segments] == expected
    assert left_out == dropped
    assert sum(s.length for s in segments) <= room


def test_pool_independent_keeps_each_labels_peak_unnormalised() -> None:
    """Multi-label windows: a conversation is worried when one window is, and hopeful
    when another is; probabilities stay each label's own (no renormalising)."""
    from workers.windows import build_windows, pool_independent

    plan = build_windows([("user", 10), ("user", 10), ("user", 10)], size=10)
    rows = [[0.9, 0.1, 0.2], [0.1, 0.8, 0.1], [0.2, 0.3, 0.1]]
    got = pool_independent(rows, plan, "salient")
    assert got.probs == (0.9, 0.8, 0.2) and got.deciding == 0
    assert pool_independent(rows, plan, "max").probs == (0.9, 0.8, 0.2)
    mean = pool_independent(rows, plan, "mean").probs
    assert mean == pytest.approx((0.4, 0.4, 0.4 / 3))
    one = build_windows([("user", 5)], size=10)
    assert pool_independent([[0.7, 0.2]], one, "mean").probs == (0.7, 0.2)
    with pytest.raises(ValueError, match="2 probability rows for 3 windows"):
        pool_independent(rows[:2], plan, "max")


# A window of small talk that leans toward a label (0.58 social, 0.40 background)
# and the request's window (0.55 learning, 0.05 background): by raw probability
# the small talk wins; by its margin over the background the request does.
LEAN, ASK = [0.40, 0.58, 0.02], [0.05, 0.40, 0.55]


def test_margin_pooling_picks_the_window_that_stands_out_from_the_background() -> None:
    plan = plan_of(*[("user", 5)] * 3)
    rows = [S, LEAN, ASK]
    assert pool(rows, plan, "salient", background=(0,)).deciding == 1  # the old rule: small talk
    pooled = pool(rows, plan, "margin", background=(0,))
    assert pooled.deciding == 2 and pooled.probs == tuple(ASK)


def test_margin_pooling_with_nothing_but_background_is_recency() -> None:
    plan = plan_of(*[("user", 5)] * 3)
    rows = [S, T, S]
    assert pool(rows, plan, "margin", background=(0,)) == pool(rows, plan, "recency")
    assert pool([A, B], plan_of(("user", 3), ("user", 3)), "margin") == pool(
        [A, B], plan_of(("user", 3), ("user", 3)), "max"
    )


# An old request resolved long ago (0.95 professional) and the request appended
# after it (0.70 learning): margin takes the surer one, latest the one asked last.
OLD, NEW = [0.03, 0.95, 0.02], [0.10, 0.20, 0.70]


def test_latest_pooling_takes_the_last_window_that_stands_out_from_the_background() -> None:
    plan = plan_of(*[("user", 5)] * 4)
    rows = [S, OLD, NEW, S]
    assert pool(rows, plan, "margin", background=(0,)).deciding == 1
    pooled = pool(rows, plan, "latest", background=(0,))
    assert pooled.deciding == 2 and pooled.probs == tuple(NEW)
    # small talk that leans but does not beat the background never decides
    assert (
        pool(
            [S, ASK, LEAN[:1] + [0.3, 0.3]], plan_of(*[("user", 5)] * 3), "latest", background=(0,)
        ).deciding
        == 1
    )


def test_latest_pooling_without_a_request_or_background_falls_back() -> None:
    plan = plan_of(*[("user", 5)] * 3)
    assert pool([S, T, S], plan, "latest", background=(0,)) == pool([S, T, S], plan, "recency")
    two = plan_of(("user", 3), ("user", 3))
    assert pool([A, B], two, "latest") == pool([A, B], two, "max")
    assert pool_independent([OLD, NEW], two, "latest").probs == (0.1, 0.95, 0.7)


@pytest.mark.parametrize(
    ("turns", "context", "expected"),
    [
        # each user turn its own window; assistant turns are not read alone
        (
            [("user", 3), ("assistant", 4), ("user", 5)],
            0,
            [[(0, 0, 3)], [(2, 0, 5)]],
        ),
        # with context: the last tokens of the turn before (empty turns skipped)
        (
            [("user", 3), ("assistant", 4), ("assistant", 0), ("user", 5)],
            2,
            [[(0, 0, 3)], [(1, 2, 4), (3, 0, 5)]],
        ),
        # a long user turn is cut; only its first piece carries the context
        (
            [("assistant", 6), ("user", 20)],
            2,
            [[(0, 4, 6), (1, 0, 8)], [(1, 6, 16)], [(1, 14, 20)]],
        ),
        # no user turn at all: packed as build_windows packs it
        ([("assistant", 6), ("assistant", 6)], 2, [[(0, 0, 6)], [(1, 0, 6)]]),
    ],
)
def test_build_turn_windows(turns, context, expected) -> None:
    plan = build_turn_windows(turns, size=10, overlap=2, context=context)
    assert spans(plan) == expected
    assert all(w.tokens <= 10 for w in plan.windows)


def test_turn_windows_keep_the_first_and_latest_and_list_empty_turns() -> None:
    turns = [("user", 3), ("user", 0)] + [("user", 3)] * 5
    plan = build_turn_windows(turns, size=10, max_windows=3)
    assert [w.turns for w in plan.windows] == [(0,), (5,), (6,)]
    assert [w.turns for w in plan.skipped] == [(2,), (3,), (4,)]
    assert plan.empty_turns == (1,)
    with pytest.raises(ValueError, match="turn context"):
        build_turn_windows(turns, size=10, context=10)
