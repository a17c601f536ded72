"""A memory-budget simulator: a fake device that raises the real OOM error.

`FLEET_SIMULATE_MEMORY="0:0,1:4096"` gives tier 0 a budget of 0 tokens (every
sub-batch runs out of memory) and tier 1 a budget of 4096. Before each
sub-batch the runtime asks the simulator; when the padded cost exceeds the
tier's budget it raises `torch.OutOfMemoryError`, exactly the type a GPU
raises, so CPU tests drive every branch of the real OOM policy in the real
worker.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySimulator:
    budgets: dict[int, int]  # tier -> most padded tokens a sub-batch may cost

    @classmethod
    def parse(cls, spec: str | None) -> MemorySimulator | None:
        if not spec:
            return None
        budgets: dict[int, int] = {}
        for part in spec.split(","):
            tier, _, tokens = part.strip().partition(":")
            try:
                budgets[int(tier)] = int(tokens)
            except ValueError:
                raise ValueError(
                    f"FLEET_SIMULATE_MEMORY must look like '0:0,1:4096', got {spec!r}"
                ) from None
        return cls(budgets)

    def check(self, tier: int, padded_cost: int) -> None:
        budget = self.budgets.get(tier)
        if budget is not None and padded_cost > budget:
            import torch

            raise torch.OutOfMemoryError(
                f"simulated out of memory: tier {tier} sub-batch costs {padded_cost} tokens, "
                f"budget {budget}"
            )
