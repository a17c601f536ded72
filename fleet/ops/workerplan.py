"""What a run's local workers will be: parallel or one task at a time, on
which GPUs, with how many torch threads, from what every task's model needs
and what this machine has free (fleet.ops.localworkers starts them).

The memory estimate of a task is its first tier's `footprint_mb`, or 1.3 x its
weights on disk (workers.device.footprint_mb, the estimate the worker itself
starts from), plus what a worker process holds before any model (Python, torch,
a CUDA context).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from config.taskconfig import TaskSpec, resolve_model_path
from fleet.ops.gpus import gpu_free_mb, visible_gpus

# What a worker holds besides 1.3 x its weights: the interpreter with torch and
# transformers (~450 MiB), activations and allocator slack. In the bundled nightly on
# the CPU the Whisper base worker's proportional set size (libtorch's pages shared
# between workers counted once) was 1.2 GiB, 0.8 GiB above 1.3 x its weights; on a
# GPU, a CUDA context.
PROCESS_MB = 700.0
MEMORY_SHARE = 0.85  # of the free memory, as workers.policy.start_tier leaves headroom

Counts = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Plan:
    """Which local workers a run starts and how.

    mode: "parallel" or "sequential"; gpus: the GPU of each worker of a task
    ((None,) on a CPU-only machine); threads: torch threads per worker;
    need_mb: estimated MiB per task on one device (model and process);
    budget_mb: MiB the workers may take per device (None: unknown); why: one
    line for people.
    """

    mode: str
    gpus: tuple[int | None, ...]
    threads: int
    need_mb: dict[str, float]
    budget_mb: float | None
    why: str


def plan_workers(
    need_mb: Mapping[str, float],
    *,
    gpus: int,
    cores: int,
    budget_mb: float | None,
    mode: str = "auto",
) -> Plan:
    """Decide parallel or sequential, the GPUs and the torch threads per worker.

    need_mb: task -> estimated MiB of one worker (model + process); gpus: visible
    GPUs (0: CPU only); cores: CPU cores this process may use; budget_mb: MiB
    the workers may take on one device (None: unknown, taken as enough); mode:
    "auto", "parallel" or "sequential" (forced). Parallel needs the sum of every
    task's need to fit the budget, since a device holds one worker per task.
    """
    total = sum(need_mb.values())
    if mode == "auto":
        fits = budget_mb is None or total <= budget_mb
        mode = "parallel" if fits else "sequential"
        if budget_mb is None:
            why = "free memory unknown: every task at once"
        elif fits:
            why = f"~{total:,.0f} MiB for every task's worker at once fits {budget_mb:,.0f} MiB"
        else:
            why = (
                f"~{total:,.0f} MiB for every task's worker at once does not fit {budget_mb:,.0f} MiB: "
                "one task at a time"
            )
    else:
        why = f"FLEET_LOCAL_WORKERS_MODE={mode}"
    at_once = len(need_mb) if mode == "parallel" else 1
    per_device = max(at_once, 1) * max(gpus, 1)
    return Plan(
        mode=mode,
        gpus=tuple(range(gpus)) if gpus else (None,),
        threads=max(1, cores // per_device),
        need_mb=dict(need_mb),
        budget_mb=budget_mb,
        why=why,
    )


def open_items(counts: Counts, task: str) -> int:
    c = counts.get(task, {})
    return c.get("pending", 0) + c.get("queued", 0) + c.get("running", 0)


def upstream(specs: Sequence[TaskSpec]) -> dict[str, set[str]]:
    """task -> the tasks of this run it follows, directly or not (transcribe for audio_intent)."""
    direct = {s.name: {u.name for u in specs if s.name in u.then} for s in specs}
    out: dict[str, set[str]] = {}
    for name in direct:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += direct.get(u, set())
        out[name] = seen
    return out


def has_work(counts: Counts, task: str, ups: Mapping[str, set[str]]) -> bool:
    """A task needs its worker: items open, or a task it follows still has items open."""
    return open_items(counts, task) > 0 or any(open_items(counts, u) for u in ups.get(task, ()))


def next_turn(order: Sequence[str], counts: Counts, *, skip: set[str]) -> str | None:
    """Sequential mode: the first task in run order (follow-ups after the task they
    follow) with open items, leaving out `skip` (broken or served elsewhere)."""
    return next((t for t in order if t not in skip and open_items(counts, t) > 0), None)


def footprint_mb(spec: TaskSpec, models_dir: Path) -> float:
    """MiB the task's first tier takes (workers.device.footprint_mb, the worker's own
    estimate), else 0 (no weights: a fake model or a missing one)."""
    from workers.device import footprint_mb as tier_footprint_mb

    tier = spec.ladder[0]
    return tier_footprint_mb(tier, resolve_model_path(tier, models_dir)) or 0.0


def mem_available_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def plan_for(specs: Sequence[TaskSpec], settings: Settings) -> Plan:
    """The plan for these tasks on this machine, under the settings."""
    gpus = visible_gpus()
    need = {s.name: footprint_mb(s, settings.resolved_models_dir) + PROCESS_MB for s in specs}
    budget: float | None = settings.local_workers_memory_mb
    if budget is None:
        free = gpu_free_mb() if gpus else mem_available_mb()
        budget = free * MEMORY_SHARE if free is not None else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return plan_workers(
        need, gpus=gpus, cores=cores or 1, budget_mb=budget, mode=settings.local_workers_mode
    )
