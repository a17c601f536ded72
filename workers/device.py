"""Which device this worker uses and how much memory it has free.

`fleet worker --gpu N` sets CUDA_VISIBLE_DEVICES before torch is imported, so
the pinned GPU is always `cuda:0` inside the worker.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

from config.taskconfig import TierSpec


def pick_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads for torch's intra-op work (None: torch's default, every
    core). Local workers sharing a CPU-only machine each get their share of the cores."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def free_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None  # CPU: start at the top of the ladder, the OOM policy steps down
    import torch

    free, _total = torch.cuda.mem_get_info()
    return free / 2**20


def allocated_mb(device: str) -> float:
    if not device.startswith("cuda"):
        return 0.0
    import torch

    return torch.cuda.memory_allocated() / 2**20


def release_memory(device: str) -> None:
    """Drop what Python and the CUDA caching allocator hold after an OOM or unload.

    The heap is thawed first (`freeze_heap`), so an unloaded model's reference
    cycles are collected too, and frozen again afterwards.
    """
    gc.unfreeze()
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    gc.freeze()


def freeze_heap() -> int:
    """Take every object alive now (the imported libraries, the loaded model)
    out of the cyclic garbage collector's scans; returns how many were frozen.

    A worker with torch and transformers loaded holds about 300,000 objects
    that live as long as the process, and every full (generation 2) collection
    walks them all: about 150 ms each, about once per 8,192-item batch, measured
    in one worker process (docs/benchmarks.md). Frozen objects are still freed
    by reference counting; `release_memory` thaws them before it collects, so
    a model that is unloaded is collected whole. `gc.freeze` is Python's own
    remedy for long-lived heaps (Python 3.7; docs of the `gc` module).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def weights_mb(folder: Path) -> float | None:
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    if not files:
        return None
    return sum(f.stat().st_size for f in files) / 2**20


# What a loaded model takes beyond its weights: activations and allocator slack.
FOOTPRINT_FACTOR = 1.3


def footprint_mb(tier: TierSpec, folder: Path) -> float | None:
    """Estimated MiB of device memory a tier takes once loaded: its `footprint_mb`
    when the task config sets one, else FOOTPRINT_FACTOR x its weights on disk
    (*.safetensors, *.bin under `folder`), else None (no weights found).

    The worker picks its starting tier with it (workers.runtime) and a run's
    local workers plan with it (fleet.ops.workerplan), so both agree."""
    if tier.footprint_mb is not None:
        return float(tier.footprint_mb)
    weights = weights_mb(folder)
    return weights * FOOTPRINT_FACTOR if weights else None


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error (torch's, MemoryError, or a RuntimeError
    saying so): the runtime's to handle by shrinking the batch or the model, never an
    item's error. Adapters re-raise it instead of failing items."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def device_name(device: str) -> str:
    """The GPU's name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(0))


def memory_reader(device: str) -> Callable[[], tuple[int, int, int]]:
    """A reader of bytes (allocated, reserved, total) on the worker's device; zeros on CPU."""
    if not device.startswith("cuda"):
        return lambda: (0, 0, 0)
    import torch

    total = int(torch.cuda.get_device_properties(0).total_memory)

    def read() -> tuple[int, int, int]:
        return int(torch.cuda.memory_allocated(0)), int(torch.cuda.memory_reserved(0)), total

    return read


def memory_report(device: str) -> dict[str, float]:
    """MiB free, total, allocated, reserved and peak allocated on a CUDA device
    (`fleet_info`, workers.state.describe); empty on CPU."""
    if not device.startswith("cuda"):
        return {}
    import torch

    free, total = torch.cuda.mem_get_info()
    return {
        "device_free_mb": round(free / 2**20, 1),
        "device_total_mb": round(total / 2**20, 1),
        "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
        "reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1),
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }
