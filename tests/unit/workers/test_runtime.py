"""The runtime's OOM policy, driven on CPU by the memory-budget simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.taskconfig import TaskSpec, TierSpec
from workers.adapters.base import InputError, Prepared, Source
from workers.adapters.fake import FakeAdapter
from workers.runtime import ModelMissing, ModelRuntime
from workers.simulate import MemorySimulator


def _tiers(tmp_path: Path, n: int, budget: int = 1000) -> tuple[TierSpec, ...]:
    tiers = []
    for i in range(n):
        d = tmp_path / f"tier{i}"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text("{}")
        tiers.append(TierSpec(name=f"tier{i}", path=str(d), max_batch_tokens=budget))
    return tuple(tiers)


def _sources(n: int, words: int = 10) -> list[Source]:
    return [
        Source(
            i,
            "conversation",
            f"e{i}",
            {"messages": [{"role": "user", "content": "w " * (words + i % 3)}]},
        )
        for i in range(n)
    ]


def _runtime(
    tmp_path: Path, tiers: int, sim: str | None, budget: int = 1000
) -> tuple[ModelRuntime, FakeAdapter]:
    adapter = FakeAdapter()
    spec = TaskSpec("t", "fake", "conversation", _tiers(tmp_path, tiers, budget))
    rt = ModelRuntime(
        spec, adapter, models_dir=tmp_path, device="cpu", simulator=MemorySimulator.parse(sim)
    )
    rt.start()
    return rt, adapter


def test_no_oom_runs_in_few_sub_batches(tmp_path):
    rt, adapter = _runtime(tmp_path, 1, None)
    results, stats = rt.run(_sources(40))
    assert [r.error for r in results] == [None] * 40
    assert stats.ooms == 0 and stats.sub_batches == len(adapter.calls) <= 2


def test_oom_halves_the_budget_and_completes(tmp_path):
    rt, adapter = _runtime(tmp_path, 1, "0:100")  # padded cost above 100 tokens OOMs
    results, stats = rt.run(_sources(40))
    assert all(r.error is None and r.tier == 0 for r in results)
    assert stats.ooms >= 1 and stats.downshifts == 0
    assert rt.budget.tokens <= 100  # remembered for the next batch
    assert max(adapter.calls) * 12 <= 100
    _, stats2 = rt.run(_sources(40))
    assert stats2.ooms == 0  # the remembered budget already fits


def test_oom_at_every_budget_steps_down_a_tier(tmp_path):
    rt, _ = _runtime(tmp_path, 3, "0:0,1:0,2:1000")
    results, stats = rt.run(_sources(20))
    assert all(r.error is None for r in results)
    assert {r.tier for r in results} == {2}
    assert {r.model_name for r in results} == {"tier2"}
    assert stats.downshifts == 2 and rt.tier == 2


def test_oom_on_smallest_tier_fails_only_the_items_that_do_not_fit(tmp_path):
    srcs = _sources(10)
    srcs[3] = Source(
        3, "conversation", "big", {"messages": [{"role": "user", "content": "w " * 500}]}
    )
    rt, _ = _runtime(tmp_path, 1, "0:200")
    results, _ = rt.run(srcs)
    errors = {r.item_id: r.error for r in results if r.error}
    assert list(errors) == [3]
    assert "out of memory on the smallest model" in errors[3]


def test_step_up_after_clean_batches(tmp_path):
    rt, _ = _runtime(tmp_path, 2, "0:0")
    rt.run(_sources(4))
    assert rt.tier == 1
    rt.simulator = None
    rt.step_up_after = 2
    rt.run(_sources(4))
    assert rt.tier == 1
    rt.run(_sources(4))
    assert rt.tier == 0


def test_bad_input_fails_alone(tmp_path):
    rt, _ = _runtime(tmp_path, 1, None)
    srcs = _sources(5)
    srcs[1] = Source(1, "conversation", "x", {"messages": []})
    srcs[2] = Source(2, "conversation", "y", {"messages": [{"content": "no role"}]})
    results, _ = rt.run(srcs)
    errors = {r.item_id: r.error for r in results}
    assert errors[0] is None and errors[3] is None and errors[4] is None
    assert errors[1] == "conversation has no messages"
    assert "has no role" in errors[2]


class ExplodingAdapter(FakeAdapter):
    def predict(self, batch: list[Prepared]):
        if any("boom" in p.payload for p in batch):
            raise ValueError("model produced NaN")
        return super().predict(batch)


def test_model_error_is_isolated_to_its_item(tmp_path):
    adapter = ExplodingAdapter()
    spec = TaskSpec("t", "fake", "conversation", _tiers(tmp_path, 1))
    rt = ModelRuntime(spec, adapter, models_dir=tmp_path, device="cpu")
    rt.start()
    srcs = _sources(6)
    srcs[4] = Source(4, "conversation", "b", {"messages": [{"role": "user", "content": "boom"}]})
    results, _ = rt.run(srcs)
    bad = {r.item_id: r.error for r in results if r.error}
    assert list(bad) == [4] and "model produced NaN" in bad[4]


def test_missing_model_folder_says_what_to_do(tmp_path):
    spec = TaskSpec("t", "fake", "conversation", (TierSpec(name="m", path="nowhere"),))
    rt = ModelRuntime(spec, FakeAdapter(), models_dir=tmp_path, device="cpu")
    with pytest.raises(ModelMissing, match="fleet models prepare"):
        rt.start()


def test_simulator_spec_errors():
    with pytest.raises(ValueError, match="FLEET_SIMULATE_MEMORY"):
        MemorySimulator.parse("zero:lots")
    assert MemorySimulator.parse("") is None


def test_input_error_message_kept():
    assert str(InputError("why")) == "why"


def test_results_record_the_revision_of_the_tier_that_ran(tmp_path):
    from wire.hub import folder_revision

    rt, _ = _runtime(tmp_path, 2, "0:0")  # tier 0 cannot run anything: every item steps down
    (tmp_path / "tier1" / "config.json").write_text('{"hidden_size": 32}')  # other weights
    results, stats = rt.run(_sources(3))
    assert stats.downshifts == 1 and rt.tier == 1
    expected = folder_revision(tmp_path / "tier1")
    assert expected.startswith("sha256:") and expected != folder_revision(tmp_path / "tier0")
    assert {r.model_revision for r in results} == {expected}


class _CyclicModel:
    """A model whose parts refer to each other, as torch modules' do: only the
    cyclic garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


class _CyclicAdapter(FakeAdapter):
    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        super().load(tier, model_path, device)
        self.model: _CyclicModel | None = _CyclicModel()

    def unload(self) -> None:
        super().unload()
        self.model = None


def test_a_loaded_model_is_frozen_out_of_gc_scans_and_collected_once_unloaded(tmp_path):
    import gc
    import weakref

    adapter = _CyclicAdapter()
    spec = TaskSpec("t", "fake", "conversation", _tiers(tmp_path, 2))
    rt = ModelRuntime(
        spec, adapter, models_dir=tmp_path, device="cpu", simulator=MemorySimulator.parse(None)
    )
    try:
        rt.start()
        assert adapter.model is not None
        first = weakref.ref(adapter.model)
        assert gc.get_freeze_count() > 0
        assert all(first() is not o for o in gc.get_objects())  # not in any scanned generation
        rt._switch(1)  # an OOM step-down: unload, release, load the next tier
        assert first() is None  # the unloaded model's cycle was collected, not kept frozen
        assert adapter.model is not None and gc.get_freeze_count() > 0
        rt.stop()
    finally:
        gc.unfreeze()
