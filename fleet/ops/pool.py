"""The worker processes both supervisors keep: one record, one start, one
rule for a process that exits.

    `fleet workers`            fleet.ops.supervisor: every GPU's worker, always up
    `--local-workers`          fleet.ops.localworkers: the workers a run needs, while it runs

Both start a real `celery worker` per (task, GPU) slot with its log in
`<task>-<gpuN|cpu>.log`, and treat an exit the same way:

    exit 2 (ExitCode.CONFIG)   a missing model or a bad task config: no restart can
                               fix it, so the slot is given up
    any other exit             restart after capped exponential backoff
                               (FLEET_RESTART_BACKOFF doubling, at most RESTART_CAP_S),
                               the count reset once the process stayed up STABLE_AFTER_S

What differs is the policy around it (which slots are wanted, and when), which
stays in each supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from config.exitcodes import ExitCode
from wire.retry import backoff

STABLE_AFTER_S = 60.0  # a worker up this long has its restart backoff reset
RESTART_CAP_S = 60.0  # the longest wait before a restart


def slot_name(gpu: int | None) -> str:
    """ "gpu0" for a pinned worker, "cpu" for one without a GPU."""
    return f"gpu{gpu}" if gpu is not None else "cpu"


def log_file(log_dir: Path, task: str, gpu: int | None) -> Path:
    """Where a slot's worker writes its output: `<log_dir>/<task>-<gpuN|cpu>.log`."""
    return log_dir / f"{task}-{slot_name(gpu)}.log"


@dataclass
class WorkerProcess:
    """One (task, GPU) slot's worker process, started again in place when it dies.

    `log`: its output file (appended; None: inherit this process's output);
    `name`: the Celery hostname it was started with ("" when the command picks it).
    """

    task: str
    gpu: int | None
    log: Path | None = None
    name: str = ""
    proc: subprocess.Popen[bytes] | None = None
    out: IO[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0

    @property
    def slot(self) -> str:
        return slot_name(self.gpu)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, argv: list[str], env: dict[str, str], *, detach: bool) -> int:
        """Start the worker; returns its pid.

        detach: no stdin and a process group of its own, so a Ctrl-C at the
        terminal reaches only the `fleet` process, which then stops it in order.
        Raises OSError when the command cannot be started."""
        out = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.close_log()
            out = self.out = self.log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL if detach else None,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=detach,
        )
        self.started = time.monotonic()
        return self.proc.pid

    def exited(self) -> int | None:
        """The exit code of a process that has ended since the last call (the record
        then holds no process); None while it runs or when none was started."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.proc = None
        return code

    def after_exit(self, code: int, now: float, *, base: float) -> float | None:
        """The reap rule: None to give the slot up (exit 2, a configuration error),
        else the seconds until its restart (also set as `next_start`)."""
        if code == ExitCode.CONFIG:
            return None
        if now - self.started > STABLE_AFTER_S:
            self.restarts = 0
        delay = backoff(self.restarts, base=base, cap=RESTART_CAP_S, jitter=False)
        self.restarts += 1
        self.next_start = now + delay
        return delay

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send `sig` to the process (its whole group with `group`), if it still runs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def close_log(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


def term_as_exit(signum: int, _frame: object) -> NoReturn:
    """A SIGTERM handler that unwinds like Ctrl-C: SystemExit(128 + signum), so
    `finally` blocks run (runs rows closed, workers stopped)."""
    raise SystemExit(128 + signum)


def unwind_on_sigterm() -> object:
    """Make SIGTERM (systemd, Kubernetes, `kill`) unwind like Ctrl-C: `fleet run`
    and `fleet nightly` then exit 128+15 through SystemExit, so the runs row is
    closed as interrupted and local workers are stopped. Returns the previous
    handler. Raises ValueError outside the main thread."""
    return signal.signal(signal.SIGTERM, term_as_exit)
