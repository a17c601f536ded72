from __future__ import annotations

import random

import pytest

from workers.policy import (
    Budget,
    OomAction,
    PoisonAction,
    next_budget,
    on_oom,
    padded_cost,
    plan_batches,
    poison_plan,
    start_tier,
    step_up,
)


@pytest.mark.parametrize(
    ("costs", "max_tokens", "max_items", "expected"),
    [
        ([], 100, None, []),
        ([(1, 10)], 100, None, [[1]]),
        # longest first; 3 x 30 = 90 fits, a 4th would be 120
        ([(1, 10), (2, 30), (3, 20), (4, 30), (5, 30)], 100, None, [[2, 4, 5], [3, 1]]),
        # an item larger than the budget runs alone
        ([(1, 500), (2, 10), (3, 10)], 100, None, [[1], [2, 3]]),
        # max_items caps the count
        ([(i, 1) for i in range(5)], 1000, 2, [[0, 1], [2, 3], [4]]),
        # zero-cost items count as one token
        ([(1, 0), (2, 0)], 1, None, [[1], [2]]),
    ],
)
def test_plan_batches(costs, max_tokens, max_items, expected):
    assert plan_batches(costs, max_tokens=max_tokens, max_items=max_items) == expected


def test_plan_batches_respects_budget_and_keeps_every_item():
    rng = random.Random(3)
    costs = [(i, rng.randint(1, 300)) for i in range(500)]
    plans = plan_batches(costs, max_tokens=2048)
    assert sorted(k for p in plans for k in p) == list(range(500))
    by_key = dict(costs)
    for p in plans:
        assert len(p) == 1 or padded_cost([by_key[k] for k in p]) <= 2048


@pytest.mark.parametrize(
    ("budget", "oom", "used", "expected"),
    [
        (Budget(1000), True, None, Budget(500)),
        (Budget(1000), True, 300, Budget(150)),  # shrink below what failed, not the budget
        (Budget(100), True, None, Budget(64)),  # floor
        (Budget(1000, 6), False, None, Budget(1000, 7)),
        (Budget(1000, 7), False, None, Budget(1250, 0)),  # 8th success grows by 1.25
        (Budget(3900, 7), False, None, Budget(4000, 0)),  # ceiling
        (Budget(4000, 7), False, None, Budget(4000, 8)),  # at ceiling: stays
    ],
)
def test_next_budget(budget, oom, used, expected):
    assert next_budget(budget, oom=oom, floor=64, ceiling=4000, used=used) == expected


@pytest.mark.parametrize(
    ("items", "tier", "tiers", "expected"),
    [
        (8, 0, 3, OomAction.RETRY_SMALLER),
        (2, 2, 3, OomAction.RETRY_SMALLER),
        (1, 0, 3, OomAction.DOWNSHIFT),
        (1, 1, 3, OomAction.DOWNSHIFT),
        (1, 2, 3, OomAction.GIVE_UP),
        (1, 0, 1, OomAction.GIVE_UP),
    ],
)
def test_on_oom(items, tier, tiers, expected):
    assert on_oom(sub_batch_items=items, tier=tier, tiers=tiers) is expected


@pytest.mark.parametrize(
    ("footprints", "free", "expected"),
    [
        ([14000, 7000, 2000], None, 0),  # CPU / unknown: top
        ([14000, 7000, 2000], 80000, 0),
        ([14000, 7000, 2000], 10000, 1),  # 7000 <= 8500
        ([14000, 7000, 2000], 5000, 2),
        ([14000, 7000, 2000], 1000, 2),  # nothing fits: smallest
        ([None, 7000], 100, 0),  # unknown footprint: try it
    ],
)
def test_start_tier(footprints, free, expected):
    assert start_tier(footprints, free) == expected


@pytest.mark.parametrize(
    ("tier", "clean", "after", "expected"),
    [(0, 100, 5, 0), (2, 4, 5, 2), (2, 5, 5, 1), (1, 50, None, 1)],
)
def test_step_up(tier, clean, after, expected):
    assert step_up(tier=tier, clean_batches=clean, after=after) == expected


@pytest.mark.parametrize(
    ("deliveries", "allowed", "action", "parts"),
    [
        ([(1, 0), (2, 0)], 2, PoisonAction.RUN, ()),
        # suspects among clean items: the clean run together, each suspect alone
        ([(1, 0), (2, 1), (3, 0), (4, 2)], 2, PoisonAction.SPLIT, ((1, 3), (2,), (4,))),
        # only suspects: each alone, counts kept
        ([(1, 1), (2, 1), (3, 1)], 2, PoisonAction.SPLIT, ((1,), (2,), (3,))),
        ([(7, 3), (8, 1)], 2, PoisonAction.SPLIT, ((7,), (8,))),
        # alone: the first death may have been in a group and does not count
        ([(7, 1)], 2, PoisonAction.RUN, ()),
        ([(7, 2)], 2, PoisonAction.RUN, ()),
        ([(7, 3)], 2, PoisonAction.DEAD, ((7,),)),
        ([(7, 1)], 1, PoisonAction.RUN, ()),
        ([(7, 2)], 1, PoisonAction.DEAD, ((7,),)),
    ],
)
def test_poison_plan(deliveries, allowed, action, parts):
    plan = poison_plan(deliveries, crashes_allowed=allowed)
    assert (plan.action, plan.parts) == (action, parts)


def _isolate(poison: set[int], *, n: int, batch_size: int, allowed: int) -> tuple[set, set, int]:
    """Simulate the ledger and worker deaths until every item is settled: claims
    take pending items in order (so suspects of different dead batches meet
    again), a start counts a delivery, a split takes it back, a batch holding a
    poison item kills its worker and comes back after its lease."""
    deliveries = dict.fromkeys(range(n), 0)
    pending, queue = list(range(n)), []
    done, dead, deaths = set(), set(), 0
    while pending or queue:
        if not queue:
            pending.sort()
            queue = [tuple(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
            pending = []
        batch = queue.pop(0)
        for i in batch:
            deliveries[i] += 1
        plan = poison_plan([(i, deliveries[i] - 1) for i in batch], crashes_allowed=allowed)
        if plan.action is PoisonAction.SPLIT:
            for i in batch:
                deliveries[i] -= 1
            queue.extend(plan.parts)
        elif plan.action is PoisonAction.DEAD:
            dead |= set(batch)
        elif poison & set(batch):
            deaths += 1
            pending.extend(batch)  # lease expired: reclaimed with whatever else is pending
        else:
            done |= set(batch)
        assert deaths <= 100, "isolation does not terminate"
    return done, dead, deaths


@pytest.mark.parametrize("allowed", [1, 2, 3])
@pytest.mark.parametrize("poison", [{13}, {13, 21}, {3, 4, 5, 60}])
def test_poison_isolation_terminates_and_spares_the_innocent(poison, allowed):
    done, dead, deaths = _isolate(poison, n=64, batch_size=8, allowed=allowed)
    assert dead == poison and done == set(range(64)) - poison
    # each poison item: at most one death with others, then `allowed` alone
    assert deaths <= len(poison) * (allowed + 1)


@pytest.mark.parametrize(
    ("lease", "visibility", "interval"),
    [(900, 3600, 225.0), (6, 3600, 1.5), (60, 5, 1.25), (5, 5, 1.25), (2, 2, 1.0)],
)
def test_heartbeat_interval_fits_four_beats_in_the_shorter_deadline(lease, visibility, interval):
    from workers.heartbeat import interval_for

    assert interval_for(lease_seconds=lease, visibility_timeout=visibility) == interval
