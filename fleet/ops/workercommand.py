"""How a worker process is started: its Celery node name, command line and
environment. Shared by `fleet worker`, `fleet workers` (fleet.ops.supervisor), local
workers (fleet.ops.localworkers), `fleet demo` and the tests, so none of them
imports the CLI.
"""

from __future__ import annotations

import os
import secrets
import sys

from fleet.config.settings import Settings


def worker_name(task: str, *, gpu: int | None, unique: str | None = None) -> str:
    """A celery node name `<task>@<gpuN|cpu>-<unique>.%h` (celery fills in %h).

    `unique` defaults to a short random token, so two workers for one task on
    one host (by hand, or under two supervisors) never share a name: Celery,
    Flower and `fleet status` would see them as one worker.
    """
    slot = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"{task}@{slot}-{unique or secrets.token_hex(3)}.%h"


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
        "workers.app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        f"fleet.{task}",
        "-n",
        name,
        "--loglevel",
        loglevel,
        "-E",
        "--without-gossip",
        "--without-mingle",
    ]


def worker_env(settings: Settings, *, gpu: int | None) -> dict[str, str]:
    """This process's environment plus the settings a worker must share with it."""
    env = dict(os.environ)
    env.update(settings.child_env())
    # Pinned before torch is imported in the worker: the process sees one GPU as cuda:0.
    env["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpu is not None else ""
    return env
