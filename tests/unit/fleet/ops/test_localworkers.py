"""The pure decisions of fleet.ops.localworkers: parallel or sequential, threads per
worker, whose turn it is, and whether --local-workers is on."""

from __future__ import annotations

import pytest

from config.settings import Settings
from config.taskconfig import TaskSpec, TierSpec
from fleet.ops.localworkers import wanted
from fleet.ops.workerplan import has_work, next_turn, plan_workers, upstream


@pytest.mark.parametrize(
    ("need", "gpus", "cores", "budget", "mode", "want_mode", "want_gpus", "threads"),
    [
        # CPU only, everything fits: every task at once, the cores divided between them.
        ({"a": 600, "b": 600}, 0, 8, 4000, "auto", "parallel", (None,), 4),
        # CPU only, the models do not fit together: one at a time, all the cores.
        ({"a": 600, "b": 600, "c": 600}, 0, 8, 1500, "auto", "sequential", (None,), 8),
        # More workers than cores: one thread each, never zero.
        ({t: 500 for t in "abcde"}, 0, 2, None, "auto", "parallel", (None,), 1),
        # Two GPUs: a worker per task per GPU; the CPU threads shared by all four.
        ({"a": 900, "b": 900}, 2, 16, 20000, "auto", "parallel", (0, 1), 4),
        # Forced either way, whatever the memory says.
        ({"a": 600, "b": 600}, 0, 4, 100, "parallel", "parallel", (None,), 2),
        ({"a": 600, "b": 600}, 0, 4, 100000, "sequential", "sequential", (None,), 4),
    ],
)
def test_plan_workers(need, gpus, cores, budget, mode, want_mode, want_gpus, threads):
    plan = plan_workers(need, gpus=gpus, cores=cores, budget_mb=budget, mode=mode)
    assert (plan.mode, plan.gpus, plan.threads) == (want_mode, want_gpus, threads)
    assert plan.why


def test_plan_says_why_it_goes_one_at_a_time():
    plan = plan_workers({"a": 700, "b": 700}, gpus=0, cores=2, budget_mb=1000)
    assert (
        plan.why
        == "~1,400 MiB for every task's worker at once does not fit 1,000 MiB: one task at a time"
    )


def _spec(name: str, then: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(name, "fake", "conversation", (TierSpec(name="m", path="m"),), then=then)


SPECS = [_spec("transcribe", then=("audio_intent",)), _spec("intent"), _spec("audio_intent")]


def test_upstream_and_work():
    ups = upstream(SPECS)
    assert ups == {"transcribe": set(), "intent": set(), "audio_intent": {"transcribe"}}
    counts = {"transcribe": {"running": 1, "done": 4}, "audio_intent": {"done": 3}}
    # audio_intent has nothing open yet, but transcribe will create its items.
    assert has_work(counts, "audio_intent", ups)
    assert not has_work(counts, "intent", ups)


@pytest.mark.parametrize(
    ("counts", "skip", "turn"),
    [
        ({"transcribe": {"pending": 2}, "intent": {"pending": 1}}, set(), "transcribe"),
        (
            {"transcribe": {"done": 2}, "intent": {"queued": 1}, "audio_intent": {"queued": 2}},
            set(),
            "intent",
        ),
        (
            {"transcribe": {"done": 2}, "intent": {"done": 1}, "audio_intent": {"queued": 2}},
            set(),
            "audio_intent",
        ),
        ({"transcribe": {"pending": 2}, "intent": {"pending": 1}}, {"transcribe"}, "intent"),
        ({"transcribe": {"done": 2, "failed": 1}}, set(), None),
    ],
)
def test_next_turn(counts, skip, turn):
    assert next_turn([s.name for s in SPECS], counts, skip=skip) == turn


@pytest.mark.parametrize(
    ("flag", "setting", "urls", "on"),
    [
        (None, "auto", False, True),  # embedded servers: on by default
        (None, "auto", True, False),  # DATABASE_URL and BROKER_URL set: off by default
        (None, "on", True, True),
        (None, "off", False, False),
        (True, "off", True, True),  # the flag wins
        (False, "on", False, False),
    ],
)
def test_wanted(flag, setting, urls, on, monkeypatch):
    for name in ("DATABASE_URL", "BROKER_URL", "FLEET_DATABASE_URL", "FLEET_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    if urls:
        monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
        monkeypatch.setenv("BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("FLEET_LOCAL_WORKERS", setting)
    assert wanted(flag, Settings()) is on
