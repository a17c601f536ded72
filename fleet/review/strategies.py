"""Which items to review first: pure functions over stored scores (and embeddings).

Each picks `budget` items from candidates given as `Candidate`s. `scores` are
the stored probabilities {label: p} (top-5 or all labels; missing labels count
as 0).

- uncertainty: least confidence, 1 - max p (Settles, "Active Learning Literature
  Survey", 2009, section 3.1).
- margin: the smallest gap between the two likeliest labels (Scheffer et al. 2001).
- disagreement: items where two tasks (or models) answered differently, the
  most uncertain first (query by committee of two, Seung et al. 1992).
- diverse: the most uncertain pool of `pool_factor x budget` items, clustered
  with k-means into `budget` clusters of their text embeddings; the most
  uncertain item of each cluster (Zhdanov 2019, "Diverse mini-batch Active
  Learning"), so near-duplicates are not all picked.
- random: a seeded uniform sample (the baseline).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

STRATEGIES = ("uncertainty", "margin", "disagreement", "diverse", "random")


@dataclass(frozen=True)
class Candidate:
    """An item that may go out for review: its id, the stored label and scores."""

    item_id: int
    label: str | None
    scores: Mapping[str, float] = field(default_factory=dict)
    confidence: float | None = None
    other_label: str | None = None  # the other task's answer (disagreement)


def top_two(c: Candidate) -> tuple[float, float]:
    """The two largest probabilities (0.0 where fewer are stored)."""
    ps = sorted((float(p) for p in c.scores.values()), reverse=True)
    if not ps and c.confidence is not None:
        ps = [float(c.confidence)]
    ps += [0.0, 0.0]
    return ps[0], ps[1]


def least_confidence(c: Candidate) -> float:
    """1 - max p: higher is more uncertain."""
    return 1.0 - top_two(c)[0]


def margin(c: Candidate) -> float:
    """p1 - p2: lower is more uncertain."""
    p1, p2 = top_two(c)
    return p1 - p2


def pick_uncertainty(cands: Sequence[Candidate], budget: int) -> list[int]:
    """The `budget` least confident items (ties by id)."""
    ranked = sorted(cands, key=lambda c: (-least_confidence(c), c.item_id))
    return [c.item_id for c in ranked[:budget]]


def pick_margin(cands: Sequence[Candidate], budget: int) -> list[int]:
    """The `budget` items with the smallest top-two margin (ties by id)."""
    ranked = sorted(cands, key=lambda c: (margin(c), c.item_id))
    return [c.item_id for c in ranked[:budget]]


def pick_disagreement(cands: Sequence[Candidate], budget: int) -> list[int]:
    """Items whose two answers differ (an item the other side has not answered is not
    a disagreement), the least confident first."""
    split = [c for c in cands if c.other_label is not None and c.other_label != c.label]
    return pick_uncertainty(split, budget)


def pick_random(cands: Sequence[Candidate], budget: int, *, seed: int = 0) -> list[int]:
    """A seeded uniform sample."""
    ids = [c.item_id for c in cands]
    return sorted(_random.Random(seed).sample(ids, min(budget, len(ids))))


def pick_diverse(
    cands: Sequence[Candidate],
    budget: int,
    *,
    embed: Callable[[Sequence[int]], Sequence[Sequence[float]]],
    pool_factor: int = 10,
    seed: int = 0,
) -> list[int]:
    """One item per k-means cluster of the most uncertain pool's embeddings.

    `embed(item_ids)` returns one vector per id (MiniLM sentence embeddings in
    the fleet, fleet.review.embed). Clusters are k-means (scipy.cluster.vq.kmeans2,
    k-means++ start) with k = budget; a cluster's pick is its least confident
    member; empty clusters leave room filled by the next most uncertain items."""
    import numpy as np
    from scipy.cluster.vq import kmeans2

    if budget <= 0 or not cands:
        return []
    pool = sorted(cands, key=lambda c: (-least_confidence(c), c.item_id))[: budget * pool_factor]
    if len(pool) <= budget:
        return [c.item_id for c in pool]
    vectors = np.asarray(embed([c.item_id for c in pool]), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms == 0, 1.0, norms)
    _, assign = kmeans2(vectors, budget, minit="++", seed=seed)
    chosen: list[int] = []
    taken: set[int] = set()
    for k in range(budget):
        members = [i for i, a in enumerate(assign) if a == k]
        if members:  # pool is in uncertainty order: the first member is the least confident
            chosen.append(pool[members[0]].item_id)
            taken.add(members[0])
    for i, c in enumerate(pool):
        if len(chosen) >= budget:
            break
        if i not in taken:
            chosen.append(c.item_id)
    return chosen
