"""Remote control: the `fleet_info` inspect command, and the control queue's name.

Every fleet worker answers `fleet_info` with what it serves and holds, read
from its loaded runtime: task, GPU (CUDA_VISIBLE_DEVICES) and device, model
and tier, batch budget and memory. Flower's worker names say task and GPU
(`intent@gpu0.host`); this says which model the worker is on right now:

    celery -A fleet.ops.celeryapp inspect fleet_info --json [-d intent@gpu0.host]
    app.control.broadcast("fleet_info", reply=True, timeout=2)

`workers.app` imports this module, so the command is registered in every
app it builds, worker and `celery inspect` client alike. It imports no torch and no
worker state: it reads them only where the worker already loaded them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.worker.control import inspect_command

# The queue of `fleet beat`'s control worker (scheduled producer tasks, no model).
CONTROL_QUEUE = "fleet.control"
INSPECT_COMMAND = "fleet_info"


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


def _device_memory(device: str) -> dict[str, float]:
    """The device's memory (workers.device.memory_report), read only in a worker
    that loaded its device module; empty elsewhere."""
    device_module = sys.modules.get("workers.device")
    if device_module is None or "torch" not in sys.modules:
        return {}
    report: dict[str, float] = device_module.memory_report(device)
    return report


def worker_info(hostname: str, queues: list[str]) -> dict[str, Any]:
    """What this worker process serves and holds (JSON-serializable)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or None
    info: dict[str, Any] = {
        "hostname": hostname,
        "pid": os.getpid(),
        "queues": queues,
        "gpu": gpu,
        "role": "control" if queues == [CONTROL_QUEUE] else "starting",
        "task": None,
        "model": None,
        "tier": None,
    }
    state_module = sys.modules.get("workers.state")  # loaded only by model workers
    try:
        st = state_module.current() if state_module is not None else None
    except RuntimeError:  # the model is not loaded (yet)
        st = None
    memory: dict[str, Any] = {"rss_mb": _rss_mb()}
    if st is not None:
        rt = st.runtime
        info.update(
            role="worker",
            task=st.task.name,
            queue=st.task.queue,
            kind=st.task.kind,
            device=rt.device,
            tier=rt.tier,
            model=rt.model_name if rt.tier >= 0 else None,
            ladder=[t.name for t in st.task.ladder],
            budget_tokens=rt.budget.tokens,
            clean_batches=rt.clean_batches,
        )
        memory.update(_device_memory(rt.device))
    info["memory"] = memory
    return info


@inspect_command()
def fleet_info(state: Any, **_: Any) -> dict[str, Any]:
    """Task, GPU, device, model, tier and memory of this fleet worker."""
    consumer = state.consumer
    queues = sorted(consumer.app.amqp.queues.consume_from or {})
    return worker_info(consumer.hostname, queues)
