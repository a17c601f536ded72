"""Remote control: the `fleet_info` inspect command.

Every fleet worker answers `fleet_info` with what it serves and holds: task,
GPU (CUDA_VISIBLE_DEVICES) and device, model and tier, batch budget and memory.
Flower's worker names say task and GPU (`intent@gpu0.host`); this says which
model the worker is on right now:

    celery -A fleet.ops.celeryapp inspect fleet_info --json [-d intent@gpu0.host]
    app.control.broadcast("fleet_info", reply=True, timeout=2)

`wire.app` imports this module, so the command is registered in every app it
builds: model worker, `fleet beat`'s control worker and `celery inspect` client
alike. It knows nothing of models: a model worker hands it a describer at start
(`describe_with`, workers.lifecycle), and the command adds what that returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from celery.worker.control import inspect_command

from wire.keys import CONTROL_QUEUE
from wire.stats import gpu_slot

INSPECT_COMMAND = "fleet_info"

# What this process's model holds now (task, model, tier, device memory under
# "memory"), or None while nothing is loaded. Set once by a model worker.
Describer = Callable[[], dict[str, Any] | None]
_describe: Describer | None = None


def describe_with(describer: Describer | None) -> None:
    """Let `fleet_info` report what `describer` returns (None: nothing loaded)."""
    global _describe
    _describe = describer


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak_kb / 1024, 1)


def worker_info(hostname: str, queues: list[str]) -> dict[str, Any]:
    """What this worker process serves and holds (JSON-serializable)."""
    slot = gpu_slot()
    info: dict[str, Any] = {
        "hostname": hostname,
        "pid": os.getpid(),
        "queues": queues,
        "gpu": None if slot == "cpu" else slot,
        "role": "control" if queues == [CONTROL_QUEUE] else "starting",
        "task": None,
        "model": None,
        "tier": None,
    }
    memory: dict[str, Any] = {"rss_mb": _rss_mb()}
    held = _describe() if _describe is not None else None
    if held is not None:
        memory.update(held.pop("memory", {}))
        info.update(held, role="worker")
    info["memory"] = memory
    return info


@inspect_command()  # type: ignore[untyped-decorator]  # celery is untyped
def fleet_info(state: Any, **_: Any) -> dict[str, Any]:
    """Task, GPU, device, model, tier and memory of this fleet worker."""
    consumer = state.consumer
    queues = sorted(consumer.app.amqp.queues.consume_from or {})
    return worker_info(consumer.hostname, queues)
