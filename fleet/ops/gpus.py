"""The GPUs of this host, read without torch: one `nvidia-smi` query.

The supervisors (`fleet workers`, `--local-workers`) and `fleet deploy` decide
how many workers to start and whether their models fit before any worker
process exists, so they must not import torch (seconds, and a CUDA context in
the parent). A worker reads its own device through torch (workers.device).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = ["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: its index and its free memory in MiB (None when unreadable)."""

    index: int
    free_mb: float | None


def probe() -> list[Gpu]:
    """Every GPU `nvidia-smi` shows, in index order; [] without nvidia-smi or when it
    fails or times out (20 s): the callers then plan for the CPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.splitlines():
        index, _, free = (part.strip() for part in line.partition(","))
        if not index.isdigit():
            continue
        try:
            free_mb: float | None = float(free)
        except ValueError:  # "[N/A]"
            free_mb = None
        gpus.append(Gpu(int(index), free_mb))
    return gpus


def visible_gpus() -> int:
    """How many GPUs this host shows (0: none, or no nvidia-smi)."""
    return len(probe())


def gpu_free_mb() -> float | None:
    """The least free memory of the visible GPUs, in MiB (None: no GPU or unreadable)."""
    free = [g.free_mb for g in probe() if g.free_mb is not None]
    return min(free) if free else None


def parse_gpus(spec: str, *, available: int) -> list[int]:
    """'all' -> every visible GPU; '0,1,3' -> those indexes (pinned even if this
    host has fewer: they then run on the CPU, as stand-ins).

    Raises ValueError for 'all' without a visible GPU, or indexes that are not
    distinct non-negative integers."""
    spec = spec.strip()
    if spec == "all":
        if available == 0:
            raise ValueError(
                "--gpus all: no GPU is visible (nvidia-smi); name indexes to run CPU stand-ins"
            )
        return list(range(available))
    try:
        gpus = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus takes 'all' or indexes like 0,1,3; got {spec!r}") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"--gpus needs distinct non-negative indexes; got {spec!r}")
    return gpus
