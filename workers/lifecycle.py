"""A model worker's life around its batches: start (the model loads before the
first message is taken), follow the `fleet` process that started it, stop.

The process entry (fleet.ops.celeryapp) connects these to Celery's worker
signals; nothing here is connected at import.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import NoReturn

from celery import Celery

from config.exitcodes import ExitCode
from wire import control
from wire.keys import CONTROL_QUEUE, DEFAULT_QUEUE, QUEUE_PREFIX

log = logging.getLogger("fleet.worker")

# A worker that cannot load its model exits before it consumes a message, with
# ExitCode.CONFIG when a restart cannot help (a missing model, a bad task config):
# `fleet workers` does not restart it, and a deployment sees a failed start, not
# a worker that takes batches and fails each one. Anything else exits 1 and is
# restarted with backoff.


def queue_task(queues: Iterable[str]) -> str | None:
    """The task a worker consuming `queues` serves (`fleet.intent` -> "intent"),
    or None for `fleet beat`'s control worker (scheduled producer tasks, no model).

    Raises SystemExit unless exactly one task queue is named."""
    names = list(queues)
    if names == [CONTROL_QUEUE]:
        return None
    tasks = [
        q.removeprefix(QUEUE_PREFIX)
        for q in names
        if q.startswith(QUEUE_PREFIX) and q != DEFAULT_QUEUE
    ]
    if len(tasks) != 1:
        raise SystemExit(
            f"a fleet worker serves exactly one task queue, got {names or 'none'}: "
            "start it with `fleet worker --task T` or `celery -A fleet.ops.celeryapp worker -Q fleet.T`"
        )
    return tasks[0]


def start_worker(app: Celery, queues: Iterable[str], *, hostname: str) -> None:
    """Load the model of the task named by the worker's queue, once, before the
    worker takes its first batch; with `app.fleet_settings.parent_pid` set, stop
    when that process is gone.

    A worker that cannot load its model exits here (exit_before_consuming);
    one given other than one task queue raises SystemExit.
    """
    task = queue_task(queues)
    if task is None:
        return
    from workers.device import set_threads
    from workers.state import describe, start_runtime

    settings = app.fleet_settings  # type: ignore[attr-defined]
    set_threads(settings.torch_threads)
    follow_parent(settings.parent_pid)
    control.describe_with(describe)  # `fleet_info` reports the model once it is loaded
    try:
        start_runtime(settings, task, hostname=hostname, app=app)
    except Exception as exc:
        exit_before_consuming(task, exc)


def stop_worker() -> None:
    """Unload the model at shutdown (nothing when none was loaded)."""
    from workers.state import stop_runtime

    stop_runtime()


def follow_parent(pid: int | None) -> None:
    """A local worker (fleet.ops.localworkers) stops with the `fleet` process that
    started it: once that is gone (even SIGKILLed, so it could not stop its
    workers), the worker sends itself SIGTERM, Celery's warm shutdown."""
    if pid is None:
        return

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        log.warning(
            "the fleet process %d that started this worker is gone; stopping (warm shutdown)", pid
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fleet-parent", daemon=True).start()


def exit_before_consuming(task: str, exc: Exception) -> NoReturn:
    """Log why the worker for `task` cannot start and exit the process at once:
    ExitCode.CONFIG for what a restart cannot fix, 1 otherwise. Never returns."""
    from workers.runtime import ModelMissing

    config = isinstance(exc, (ModelMissing, FileNotFoundError, ValueError, LookupError))
    code = int(ExitCode.CONFIG) if config else 1
    log.error(
        "worker for task %r cannot start, so it takes no batches (exit %d): %s",
        task,
        code,
        exc,
        exc_info=not config,
    )
    logging.shutdown()
    os._exit(code)
