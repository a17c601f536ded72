"""How a worker process is started: its Celery node name, command line and
environment. Shared by `fleet worker`, `fleet workers` (fleet.ops.supervisor), local
workers (fleet.ops.localworkers), `fleet demo`, `fleet beat`'s control worker, the
tests and the benchmarks.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from config.settings import Settings
from wire import keys


def worker_name(task: str, *, gpu: int | None, unique: str | None = None) -> str:
    """A celery node name `<task>@<gpuN|cpu>-<unique>.%h` (celery fills in %h).

    `unique` defaults to a short random token, so two workers for one task on
    one host (by hand, or under two supervisors) never share a name: Celery,
    Flower and `fleet status` would see them as one worker.
    """
    slot = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"{task}@{slot}-{unique or secrets.token_hex(3)}.%h"


def solo_worker_options(queue: str, *, name: str, loglevel: str) -> list[str]:
    """The `celery worker` options every fleet worker runs with: one solo-pool
    process consuming `queue` under node name `name`, sending task events (for
    Flower and `fleet status`), without gossip and mingle (no chatter between
    workers at start)."""
    return [
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        queue,
        "-n",
        name,
        "--loglevel",
        loglevel,
        "-E",
        "--without-gossip",
        "--without-mingle",
    ]


def worker_argv(
    task: str, *, gpu: int | None, loglevel: str, hostname: str | None = None
) -> list[str]:
    """The `celery worker` command line of one solo-pool worker for `task`'s queue."""
    name = hostname or worker_name(task, gpu=gpu)
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "fleet.ops.celeryapp",
        "worker",
        *solo_worker_options(keys.task_queue(task), name=name, loglevel=loglevel),
    ]


def control_worker_args(schedule_file: Path, *, queue: str, loglevel: str) -> list[str]:
    """The `app.start(...)` arguments of `fleet beat`: a worker on the control
    `queue` (no model) with beat embedded, its schedule kept in `schedule_file`."""
    return [
        "worker",
        "--beat",
        "--schedule-filename",
        str(schedule_file),
        *solo_worker_options(queue, name="control@%h", loglevel=loglevel),
    ]


def worker_env(settings: Settings, *, gpu: int | None) -> dict[str, str]:
    """This process's environment plus the settings a worker must share with it."""
    env = dict(os.environ)
    env.update(settings.child_env())
    # Pinned before torch is imported in the worker: the process sees one GPU as cuda:0.
    env["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpu is not None else ""
    return env
