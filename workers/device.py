"""Which device this worker uses and how much memory it has free.

`fleet worker --gpu N` sets CUDA_VISIBLE_DEVICES before torch is imported, so
the pinned GPU is always `cuda:0` inside the worker.
"""

from __future__ import annotations

import gc
from pathlib import Path


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
    """Drop what Python and the CUDA caching allocator hold after an OOM or unload."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def weights_mb(folder: Path) -> float | None:
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    if not files:
        return None
    return sum(f.stat().st_size for f in files) / 2**20


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
