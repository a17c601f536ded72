"""`fleet workers`: one pinned solo-pool worker process per GPU, supervised.

Each child is a real `celery worker` with CUDA_VISIBLE_DEVICES set to its GPU
before torch is imported. A child that dies is restarted with exponential
backoff (reset once it has stayed up a minute), except one that exits with the
configuration-error code 2 (no model, bad config), which no restart can fix:
the process record and that rule are fleet.ops.pool's, shared with the local
workers of a run. SIGTERM/SIGINT stop them all with a warm shutdown, so their
current batches finish first.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from config.exitcodes import ExitCode
from config.settings import Settings
from fleet.ops.pool import WorkerProcess, log_file


def _reap(c: WorkerProcess, now: float, echo: Callable[[str], None], base: float) -> bool:
    """Notice a dead child and schedule its restart with backoff (fleet.ops.pool's
    rule); returns True when the child is given up (a configuration error)."""
    code = c.exited()
    if code is None:
        return False
    delay = c.after_exit(code, now, base=base)
    if delay is None:
        # The worker could not load its model or config: a restart cannot fix that.
        echo(
            f"{c.task}@gpu{c.gpu} exited with {code} (configuration error: its log says what "
            "to run, e.g. `fleet models prepare`); not restarting it"
        )
        return True
    echo(f"{c.task}@gpu{c.gpu} exited with {code}; restarting in {delay:.0f}s")
    return False


def supervise(
    task: str,
    gpus: list[int],
    settings: Settings,
    *,
    loglevel: str = "INFO",
    log_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Run one worker of `task` per GPU of `gpus` until SIGTERM/SIGINT, restarting
    those that die; returns 0, or ExitCode.CONFIG when every worker was given up.
    Logs go to `log_dir`/<task>-gpuN.log (None: this process's output)."""
    from fleet.ops.workercommand import worker_argv, worker_env

    children = [
        WorkerProcess(task, g, log_file(log_dir, task, g) if log_dir is not None else None)
        for g in gpus
    ]
    given_up: set[int] = set()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(child: WorkerProcess) -> None:
        pid = child.start(
            worker_argv(task, gpu=child.gpu, loglevel=loglevel),
            worker_env(settings, gpu=child.gpu),
            detach=False,
        )
        echo(f"started {task}@gpu{child.gpu} (pid {pid})")

    for c in children:
        start(c)
    while not stopping:
        now = time.monotonic()
        for i, c in enumerate(children):
            if _reap(c, now, echo, settings.restart_backoff):
                given_up.add(i)
            if c.proc is None and i not in given_up and now >= c.next_start:
                start(c)
        if len(given_up) == len(children):
            echo("no worker could start (configuration error); stopping")
            return ExitCode.CONFIG
        time.sleep(0.5)
    echo("stopping workers (warm shutdown: current batches finish)")
    for c in children:
        c.signal(signal.SIGTERM)
    for c in children:
        if c.proc is not None:
            try:
                c.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                c.proc.kill()
        c.close_log()
    return 0
