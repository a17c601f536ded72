"""The worker process's resident state: settings, task, loaded runtime, app.

`start_runtime` runs once when the worker starts (the model is loaded before
the first batch, workers.lifecycle); the batch core (workers.batch) reads the
state with `current()` for every batch; `stop_runtime` unloads at shutdown.
The Celery app the batch core sends follow-up and split batches with is
passed in at start: this module imports no app.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from config.settings import Settings
from config.taskconfig import TaskSpec, get_task, load_tasks
from wire import stats as worker_stats
from workers.adapters import make_adapter
from workers.runtime import MemoryNotReleased, ModelRuntime

log = logging.getLogger("fleet.worker")


@dataclass
class WorkerState:
    """Everything one worker process holds between batches."""

    settings: Settings
    task: TaskSpec
    tasks: dict[str, TaskSpec]
    runtime: ModelRuntime
    hostname: str
    app: Celery  # sends split parts and follow-up batches
    _redis: Any = field(default=None, repr=False)

    def broker_client(self) -> Any:
        """This process's one Redis client for the batch path (holder marks, the
        finished signal, resume keys): no connection set up per batch. None
        without a broker URL."""
        if self.settings.broker_url is None:
            return None
        if self._redis is None:
            self._redis = worker_stats.redis_client(self.settings.redis_url())
        return self._redis


_state: WorkerState | None = None


def _promoted(settings: Settings, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
    """The one place a worker's ladders are resolved: the task config's, overridden by
    the ladders `fleet promote` recorded in the database (db.ladders)."""
    from db.engine import transaction
    from db.ladders import effective_tasks

    with transaction(settings.db_url()) as session:
        return effective_tasks(session, tasks)


def start_runtime(settings: Settings, task_name: str, *, hostname: str, app: Celery) -> WorkerState:
    """Load `task_name`'s model (and start live stats when a broker is set).

    Raises ConfigError (unknown task, bad config), ModelMissing (a tier's model
    is not on disk) or whatever loading the model raises.
    """
    global _state
    from config.logs import setup_logging
    from workers import device as dev
    from workers.simulate import MemorySimulator

    setup_logging(settings.log_level, json_lines=settings.log_json)
    tasks = _promoted(settings, load_tasks(settings.config_file))
    spec = get_task(tasks, task_name)
    adapter = make_adapter(
        spec, max_chars=settings.max_text_chars, audio_root=settings.resolved_audio_root
    )
    runtime = ModelRuntime(
        spec,
        adapter,
        models_dir=settings.resolved_models_dir,
        device=dev.pick_device(),
        simulator=MemorySimulator.parse(settings.simulate_memory),
        start_at=_tier_hint(settings, spec.name),
        step_up_after=settings.step_up_after,
    )
    runtime.start()
    _state = WorkerState(settings, spec, tasks, runtime, hostname, app)
    if settings.broker_url is not None:  # live stats for `fleet status` / `fleet metrics`
        worker_stats.start(
            settings.redis_url(),
            worker=hostname,
            task=spec.name,
            device=runtime.device,
            placement=lambda: (runtime.tier, runtime.model_name),
            device_name=dev.device_name(runtime.device),
            memory=dev.memory_reader(runtime.device),
        )
    return _state


def stop_runtime() -> None:
    """Stop live stats and unload the model; nothing when none is loaded."""
    global _state
    if _state is not None:
        worker_stats.stop()
        _state.runtime.stop()
        _state = None


def current() -> WorkerState:
    """The loaded state. Raises RuntimeError before `start_runtime`."""
    if _state is None:
        raise RuntimeError("the worker runtime is not started (no model loaded)")
    return _state


def describe() -> dict[str, Any] | None:
    """What this worker holds now, for `fleet_info` (wire.control): task, queue,
    kind, device, tier, model, ladder, batch budget and, under "memory", the
    device's memory (workers.device.memory_report). None before the model loads."""
    if _state is None:
        return None
    from workers.device import memory_report

    st, rt = _state, _state.runtime
    return {
        "task": st.task.name,
        "queue": st.task.queue,
        "kind": st.task.kind,
        "device": rt.device,
        "tier": rt.tier,
        "model": rt.model_name if rt.tier >= 0 else None,
        "ladder": [t.name for t in st.task.ladder],
        "budget_tokens": rt.budget.tokens,
        "clean_batches": rt.clean_batches,
        "memory": memory_report(rt.device),
    }


def _hint_file(settings: Settings, task: str) -> Path:
    slot = worker_stats.gpu_slot()
    return settings.state_dir / "tier-hints" / f"{task}-gpu{slot}.tier"


def _tier_hint(settings: Settings, task: str) -> int | None:
    """FLEET_START_TIER, or the tier a previous process of this slot asked to
    restart on because its memory did not come back in-process."""
    if settings.start_tier is not None:
        return settings.start_tier
    hint = _hint_file(settings, task)
    if hint.is_file():
        tier = int(hint.read_text().strip() or 0)
        hint.unlink()
        log.warning("starting on tier %d as the previous worker asked", tier)
        return tier
    return None


def restart_on(st: WorkerState, exc: MemoryNotReleased) -> None:
    """Leave a tier hint for this slot and exit 75 at once, so the supervisor
    restarts the worker on `exc.next_tier` (its memory did not come back)."""
    hint = _hint_file(st.settings, st.task.name)
    hint.parent.mkdir(parents=True, exist_ok=True)
    hint.write_text(str(exc.next_tier))
    log.error("%s: exiting so the supervisor restarts this worker on tier %d", exc, exc.next_tier)
    logging.shutdown()
    # The batch is not acknowledged; its lease expires and the reconciler returns it.
    os._exit(75)
