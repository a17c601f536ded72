"""Every decision the worker runtime makes, as pure functions.

No torch here: these are table-tested on any machine, and the runtime only
applies what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


def plan_batches(
    costs: Sequence[tuple[int, int]], *, max_tokens: int, max_items: int | None = None
) -> list[list[int]]:
    """Pack (key, cost) pairs into sub-batches whose padded cost fits the budget.

    Items are sorted longest first, so neighbours have similar lengths and
    padding waste stays small (padded cost = longest x count), and an OOM, if
    one comes, comes on the first sub-batch. An item costlier than the whole
    budget still runs, alone.
    """
    ordered = sorted(costs, key=lambda kc: (-kc[1], kc[0]))
    plans: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for key, cost in ordered:
        cost = max(cost, 1)
        if current:
            # Sorted descending: the first item of a sub-batch is its longest.
            over_tokens = longest * (len(current) + 1) > max_tokens
            over_items = max_items is not None and len(current) >= max_items
            if over_tokens or over_items:
                plans.append(current)
                current = []
        if not current:
            longest = cost
        current.append(key)
    if current:
        plans.append(current)
    return plans


def padded_cost(costs: Sequence[int]) -> int:
    return max(costs, default=0) * len(costs)


@dataclass(frozen=True)
class Budget:
    """The adaptive sub-batch budget: halves on OOM, grows slowly after successes."""

    tokens: int
    successes: int = 0


def next_budget(
    budget: Budget,
    *,
    oom: bool,
    floor: int,
    ceiling: int,
    used: int | None = None,
    grow_after: int = 8,
    grow_factor: float = 1.25,
) -> Budget:
    """After an OOM, half of what the failing sub-batch used (not of the budget:
    a small sub-batch under a large budget must still shrink); after
    `grow_after` clean sub-batches, grow by `grow_factor` up to the ceiling."""
    if oom:
        base = min(budget.tokens, used) if used else budget.tokens
        return Budget(max(floor, base // 2), 0)
    successes = budget.successes + 1
    if successes >= grow_after and budget.tokens < ceiling:
        return Budget(min(ceiling, max(budget.tokens + 1, int(budget.tokens * grow_factor))), 0)
    return Budget(budget.tokens, successes)


class OomAction(StrEnum):
    RETRY_SMALLER = "retry_smaller"  # halve the budget, re-plan, go on
    DOWNSHIFT = "downshift"  # nothing smaller to try on this tier: load the next one
    GIVE_UP = "give_up"  # smallest tier, one item: fail those items with the reason


def on_oom(*, sub_batch_items: int, tier: int, tiers: int) -> OomAction:
    """What to do after an out-of-memory error on a sub-batch.

    More than one item: a smaller budget makes smaller sub-batches. One item
    alone cannot get smaller, so the model must: step down a tier.
    """
    if sub_batch_items > 1:
        return OomAction.RETRY_SMALLER
    if tier + 1 < tiers:
        return OomAction.DOWNSHIFT
    return OomAction.GIVE_UP


def start_tier(
    footprints_mb: Sequence[float | None], free_mb: float | None, *, headroom: float = 0.85
) -> int:
    """The largest tier whose estimated footprint fits the free device memory.

    Unknown free memory (CPU) or unknown footprints: start at the top and let
    the OOM policy step down if it must. Nothing fits: the smallest tier.
    """
    if free_mb is None:
        return 0
    for tier, need in enumerate(footprints_mb):
        if need is None or need <= free_mb * headroom:
            return tier
    return max(len(footprints_mb) - 1, 0)


def step_up(*, tier: int, clean_batches: int, after: int | None) -> int:
    """Optionally climb back one tier after `after` clean batches on a lower one."""
    if after is None or tier == 0 or clean_batches < after:
        return tier
    return tier - 1


class PoisonAction(StrEnum):
    RUN = "run"
    SPLIT = "split"
    DEAD = "dead"


@dataclass(frozen=True)
class PoisonPlan:
    action: PoisonAction
    parts: tuple[tuple[int, ...], ...] = ()


def poison_plan(deliveries: Sequence[tuple[int, int]], *, crashes_allowed: int) -> PoisonPlan:
    """Decide what to do with a batch from each item's earlier unfinished deliveries.

    An item delivered before and never finished was in a batch whose worker
    died: it is a suspect, and from then on it runs alone:
      - no suspects: run;
      - several items, some suspects: split; the clean items run together,
        each suspect alone (counts are kept);
      - one suspect alone: dead once its count exceeds `crashes_allowed`, else
        run. Its first death may have been with other items: it does not count
        against it, so an item is dead after `crashes_allowed` deaths alone.

    Counts are never restarted. Suspects of different dead batches meet again
    in later claims (claims go by size); with halves and restarted counts, the
    halves can be exactly the groups they came from, and two poison items then
    kill workers forever. Here every death after the first is a lone item's
    and counts against it, so isolating a poison item costs at most
    `crashes_allowed + 1` worker deaths whatever the batch size, and its
    innocent neighbours finish after one.
    """
    suspects = tuple(i for i, d in deliveries if d > 0)
    if not suspects:
        return PoisonPlan(PoisonAction.RUN)
    if len(deliveries) > 1:
        clean = tuple(i for i, d in deliveries if d <= 0)
        alone = tuple((i,) for i in suspects)
        return PoisonPlan(PoisonAction.SPLIT, ((clean, *alone) if clean else alone))
    if deliveries[0][1] > crashes_allowed:
        return PoisonPlan(PoisonAction.DEAD, (suspects,))
    return PoisonPlan(PoisonAction.RUN)
