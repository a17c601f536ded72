"""The model runtime: one resident model, a token budget that adapts, and a
ladder of smaller models to step down to when memory runs out.

    run(sources)
      prepare every item on the current tier (bad input -> that item fails)
      plan sub-batches under the budget (longest first)
      for each sub-batch:
        ok   -> record results, maybe grow the budget
        OOM  -> free memory; several items: halve the budget and re-plan;
                one item: unload, load the next tier, re-prepare what is left;
                smallest tier: fail those items with the reason
        other error -> isolate: run the items one by one, fail only the culprit

The decisions come from `workers.policy` (pure, table-tested); this module
applies them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.taskconfig import TaskSpec, with_model_folders
from wire.hub import ModelNotCached, ResolvedModel, folder_revision, resolve_tier
from workers import device as dev
from workers.adapters.base import Adapter, InputError, Prediction, Prepared, Source
from workers.policy import (
    Budget,
    OomAction,
    next_budget,
    on_oom,
    padded_cost,
    plan_batches,
    start_tier,
    step_up,
)
from workers.simulate import MemorySimulator

log = logging.getLogger("fleet.runtime")


class ModelMissing(RuntimeError):
    pass


class MemoryNotReleased(RuntimeError):
    """Unloading a tier did not give its memory back: only a new process will."""

    def __init__(self, next_tier: int, held_mb: float) -> None:
        super().__init__(
            f"{held_mb:.0f} MiB still allocated after unload; restart on tier {next_tier}"
        )
        self.next_tier = next_tier


@dataclass
class ItemResult:
    item_id: int
    prediction: Prediction | None
    error: str | None
    tier: int
    model_name: str
    latency_ms: float
    notes: dict[str, Any] = field(default_factory=dict)
    model_revision: str | None = None  # snapshot commit or sha256 of the folder (wire.hub)


@dataclass
class BatchStats:
    items: int = 0
    sub_batches: int = 0
    ooms: int = 0
    downshifts: int = 0
    step_ups: int = 0
    budget_start: int = 0
    budget_end: int = 0


class ModelRuntime:
    def __init__(
        self,
        spec: TaskSpec,
        adapter: Adapter,
        *,
        models_dir: Path,
        device: str,
        simulator: MemorySimulator | None = None,
        step_up_after: int | None = None,
        start_at: int | None = None,
    ) -> None:
        self.spec = spec
        self.adapter = adapter
        self.models_dir = models_dir
        self.device = device
        self.simulator = simulator
        self.step_up_after = step_up_after
        self.start_at = start_at
        self.tier = -1
        self.budget = Budget(0)
        self.clean_batches = 0
        self._baseline_mb = 0.0
        self.revision: str | None = None
        self._resolved: dict[int, ResolvedModel] = {}

    # -- loading -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.spec.ladder[self.tier].name

    def _path(self, tier: int) -> Path:
        """The tier's model folder (a local folder, or a Hugging Face id resolved in
        the cache with local files only). A local folder's revision is hashed when
        the tier loads (`_load`), once per process."""
        if tier not in self._resolved:
            spec = self.spec.ladder[tier]
            try:
                self._resolved[tier] = resolve_tier(spec, self.models_dir, hash_folder=False)
            except ModelNotCached as e:
                raise ModelMissing(f"task {self.spec.name!r} tier {tier} ({spec.name}): {e}") from e
        return self._resolved[tier].path

    def start(self) -> None:
        """Load the first tier that fits (or `start_at`).

        Raises ModelMissing, before anything loads, when any tier of the ladder
        has no model folder, and the adapter's ValueError when one holds a model
        it cannot serve (the optional `Adapter.check`): a worker must not take
        batches it cannot run, nor find out at its first out-of-memory step-down
        that the smaller model is absent or unfit.
        """
        check = getattr(self.adapter, "check", None)  # config files only, no weights
        for tier in range(len(self.spec.ladder)):
            path = self._path(tier)
            if check is not None:
                check(self.spec.ladder[tier], str(path))
        if self.start_at is not None:
            first = min(self.start_at, len(self.spec.ladder) - 1)
        else:
            footprints = [
                dev.footprint_mb(spec, self._path(i)) for i, spec in enumerate(self.spec.ladder)
            ]
            first = start_tier(footprints, dev.free_mb(self.device))
        self._load(first)

    def _load(self, tier: int) -> None:
        spec = self.spec.ladder[tier]
        path = self._path(tier)
        self._baseline_mb = dev.allocated_mb(self.device)
        started = time.perf_counter()
        self.adapter.load(with_model_folders(spec, self.models_dir), str(path), self.device)
        self.tier = tier
        resolved = self._resolved[tier]
        self.revision = resolved.revision or folder_revision(resolved.path)
        self.budget = Budget(spec.max_batch_tokens)
        self.clean_batches = 0
        frozen = dev.freeze_heap()  # the model lives until unloaded: out of the GC's scans
        log.info(
            "loaded task=%s tier=%d model=%s device=%s in %.1fs (%d objects frozen)",
            self.spec.name,
            tier,
            spec.name,
            self.device,
            time.perf_counter() - started,
            frozen,
        )

    def _switch(self, tier: int) -> None:
        """Unload, check the memory came back, load another tier."""
        self.adapter.unload()
        dev.release_memory(self.device)
        held = dev.allocated_mb(self.device) - self._baseline_mb
        if held > 64:
            raise MemoryNotReleased(tier, held)
        self._load(tier)

    def stop(self) -> None:
        if self.tier >= 0:
            self.adapter.unload()
            dev.release_memory(self.device)
            self.tier = -1

    # -- running -----------------------------------------------------------------

    def _floor(self) -> int:
        return max(self.spec.ladder[self.tier].min_batch_tokens, 1)

    def run(self, sources: list[Source]) -> tuple[list[ItemResult], BatchStats]:
        """Run one batch's sources: one ItemResult per source, in order, and the
        batch's stats (OOMs, step-downs; a step up decided after it)."""
        stats = self.new_stats()
        results = self.run_items(sources, stats)
        self.settle(stats)
        return results, stats

    def new_stats(self) -> BatchStats:
        """Empty stats for a batch run in several `run_items` calls."""
        return BatchStats(budget_start=self.budget.tokens)

    def run_items(self, sources: list[Source], stats: BatchStats) -> list[ItemResult]:
        """Run part of a batch (bad input fails only its item; OOM shrinks the
        budget or steps down a tier), adding to `stats`. Call `settle` once
        when the whole batch has run."""
        stats.items += len(sources)
        results: dict[int, ItemResult] = {}
        remaining = list(sources)
        while remaining:
            tier_before = self.tier
            prepared = self._prepare(remaining, results)
            leftover = self._run_prepared(prepared, results, stats)
            if self.tier == tier_before:
                break
            # Stepped down: what is left is prepared again for the new model.
            remaining = [s for s in remaining if s.item_id in leftover]
        return [results[s.item_id] for s in sources]

    def settle(self, stats: BatchStats) -> None:
        """After a whole batch: count it clean or not, maybe step up a tier."""
        if stats.ooms == 0:
            self.clean_batches += 1
            target = step_up(
                tier=self.tier, clean_batches=self.clean_batches, after=self.step_up_after
            )
            if target != self.tier:
                log.info(
                    "stepping up to tier %d after %d clean batches", target, self.clean_batches
                )
                stats.step_ups += 1
                self._switch(target)
        else:
            self.clean_batches = 0
        stats.budget_end = self.budget.tokens

    def _prepare(
        self, sources: list[Source], results: dict[int, ItemResult]
    ) -> dict[int, Prepared]:
        prepared: dict[int, Prepared] = {}
        for src in sources:
            try:
                prepared[src.item_id] = self.adapter.prepare(src)
            except InputError as e:
                results[src.item_id] = self._failed(src.item_id, str(e))
            except Exception as e:  # a bug or a surprise in the input: that item only
                log.exception("prepare failed for item %s", src.item_id)
                results[src.item_id] = self._failed(
                    src.item_id, f"could not prepare this item ({type(e).__name__}: {e})"
                )
        return prepared

    def _failed(self, item_id: int, reason: str) -> ItemResult:
        return ItemResult(
            item_id, None, reason, self.tier, self.model_name, 0.0, model_revision=self.revision
        )

    def _run_prepared(
        self, prepared: dict[int, Prepared], results: dict[int, ItemResult], stats: BatchStats
    ) -> set[int]:
        """Run everything prepared on the current tier, one planned sub-batch at a
        time. Returns the ids left over when the runtime stepped down to another tier."""
        pending = dict(prepared)
        while pending:
            sub = self._next_sub_batch(pending)
            cost = padded_cost([p.cost for p in sub])
            started = time.perf_counter()
            preds = self._predict(sub, cost)
            if preds is None:
                if self._after_oom(sub, cost, pending, results, stats) is OomAction.DOWNSHIFT:
                    return set(pending)
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            self._record(sub, preds, elapsed_ms, pending, results, stats)
        return set()

    def _ceiling(self) -> int:
        """How far the budget may grow on the current tier."""
        return self.spec.ladder[self.tier].max_batch_tokens * 4

    def _next_sub_batch(self, pending: dict[int, Prepared]) -> list[Prepared]:
        """The first sub-batch plan_batches packs under the current budget."""
        plan = plan_batches(
            [(i, p.cost) for i, p in pending.items()],
            max_tokens=self.budget.tokens,
            max_items=self.spec.ladder[self.tier].options.get("max_batch_items"),
        )
        return [pending[i] for i in plan[0]]

    def _predict(self, sub: list[Prepared], cost: int) -> list[Prediction | InputError] | None:
        """The sub-batch's predictions, or None after an out-of-memory error (the
        error, and the frames it holds, dropped here so their memory can be
        freed). Any other error is isolated to the items that cause it."""
        try:
            if self.simulator is not None:
                self.simulator.check(self.tier, cost)
            return self.adapter.predict(sub)
        except Exception as exc:
            if dev.is_oom(exc):
                return None
            return self._isolate(sub, exc)

    def _after_oom(
        self,
        sub: list[Prepared],
        cost: int,
        pending: dict[int, Prepared],
        results: dict[int, ItemResult],
        stats: BatchStats,
    ) -> OomAction:
        """Free memory and apply the OOM policy (workers.policy.on_oom): a smaller
        budget, the next tier, or, on the smallest tier with one item, fail it."""
        dev.release_memory(self.device)
        stats.ooms += 1
        action = on_oom(sub_batch_items=len(sub), tier=self.tier, tiers=len(self.spec.ladder))
        log.warning(
            "OOM task=%s tier=%d sub-batch=%d items cost=%d budget=%d -> %s",
            self.spec.name,
            self.tier,
            len(sub),
            cost,
            self.budget.tokens,
            action,
        )
        if action is OomAction.RETRY_SMALLER:
            self.budget = next_budget(
                self.budget, oom=True, floor=self._floor(), ceiling=self._ceiling(), used=cost
            )
        elif action is OomAction.DOWNSHIFT:
            stats.downshifts += 1
            self._switch(self.tier + 1)
        else:
            for p in sub:
                results[p.item_id] = self._failed(
                    p.item_id,
                    f"out of memory on the smallest model ({self.model_name}) with this "
                    f"item alone ({p.cost} tokens): shorten it or use a device with more memory",
                )
                del pending[p.item_id]
        return action

    def _record(
        self,
        sub: list[Prepared],
        preds: list[Prediction | InputError],
        elapsed_ms: float,
        pending: dict[int, Prepared],
        results: dict[int, ItemResult],
        stats: BatchStats,
    ) -> None:
        """Store a sub-batch's results (an InputError fails its item) and let the
        budget grow after the success."""
        stats.sub_batches += 1
        self.budget = next_budget(
            self.budget, oom=False, floor=self._floor(), ceiling=self._ceiling()
        )
        for p, pred in zip(sub, preds, strict=True):
            del pending[p.item_id]
            if isinstance(pred, InputError):
                results[p.item_id] = self._failed(p.item_id, str(pred))
            else:
                results[p.item_id] = ItemResult(
                    p.item_id,
                    pred,
                    pred.error,
                    self.tier,
                    self.model_name,
                    elapsed_ms / len(sub),
                    p.notes,
                    self.revision,
                )

    def _isolate(self, sub: list[Prepared], exc: Exception) -> list[Prediction | InputError]:
        """A non-memory error in a sub-batch: find which items cause it, keep the rest."""
        if len(sub) == 1:
            log.warning("item %s failed in the model: %r", sub[0].item_id, exc)
            return [InputError(f"the model failed on this item ({type(exc).__name__}: {exc})")]
        out: list[Prediction | InputError] = []
        for p in sub:
            try:
                out.extend(self.adapter.predict([p]))
            except Exception as e:
                if dev.is_oom(e):
                    raise
                out.append(InputError(f"the model failed on this item ({type(e).__name__}: {e})"))
        return out
