"""`fleet workers`: one pinned solo-pool worker process per GPU, supervised.

Each child is a real `celery worker` with CUDA_VISIBLE_DEVICES set to its GPU
before torch is imported. A child that dies is restarted with exponential
backoff (reset once it has stayed up a minute), except one that exits with the
configuration-error code 2 (no model, bad config), which no restart can fix;
SIGTERM/SIGINT stop them all
with a warm shutdown, so their current batches finish first.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.exitcodes import ExitCode
from config.settings import Settings
from wire.retry import backoff

STABLE_AFTER_S = 60.0


def visible_gpus() -> int:
    """GPUs on this host, without importing torch in the supervisor."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_gpus(spec: str, *, available: int) -> list[int]:
    """'all' -> every visible GPU; '0,1,3' -> those indexes (pinned even if this
    host has fewer: they then run on the CPU, as stand-ins)."""
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


@dataclass
class Child:
    gpu: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    given_up: bool = False


def _reap(c: Child, now: float, task: str, echo: Callable[[str], None], base: float) -> None:
    """Notice a dead child and schedule its restart with backoff."""
    if c.proc is None or c.proc.poll() is None:
        return
    code = c.proc.returncode
    if code == ExitCode.CONFIG:
        # The worker could not load its model or config: a restart cannot fix that.
        c.proc = None
        c.given_up = True
        echo(
            f"{task}@gpu{c.gpu} exited with {code} (configuration error: its log says what "
            "to run, e.g. `fleet models prepare`); not restarting it"
        )
        return
    if now - c.started > STABLE_AFTER_S:
        c.restarts = 0
    delay = backoff(c.restarts, base=base, cap=60.0, jitter=False)
    c.restarts += 1
    c.next_start = now + delay
    c.proc = None
    echo(f"{task}@gpu{c.gpu} exited with {code}; restarting in {delay:.0f}s")


def supervise(
    task: str,
    gpus: list[int],
    settings: Settings,
    *,
    loglevel: str = "INFO",
    log_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    from fleet.ops.workercommand import worker_argv, worker_env

    children = [Child(g) for g in gpus]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(child: Child) -> None:
        out = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            out = (log_dir / f"{task}-gpu{child.gpu}.log").open("ab")
        child.proc = subprocess.Popen(
            worker_argv(task, gpu=child.gpu, loglevel=loglevel),
            env=worker_env(settings, gpu=child.gpu),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        child.started = time.monotonic()
        echo(f"started {task}@gpu{child.gpu} (pid {child.proc.pid})")

    for c in children:
        start(c)
    while not stopping:
        now = time.monotonic()
        for c in children:
            _reap(c, now, task, echo, settings.restart_backoff)
            if c.proc is None and not c.given_up and now >= c.next_start:
                start(c)
        if all(c.given_up for c in children):
            echo("no worker could start (configuration error); stopping")
            return ExitCode.CONFIG
        time.sleep(0.5)
    echo("stopping workers (warm shutdown: current batches finish)")
    for c in children:
        if c.proc is not None and c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    for c in children:
        if c.proc is not None:
            try:
                c.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                c.proc.kill()
    return 0
