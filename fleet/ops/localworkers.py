"""Local workers: the `celery worker` processes a run needs on this machine,
started, supervised and stopped by the run itself (`fleet run --local-workers`,
`fleet nightly --local-workers`, `fleet demo`).

    plan     one worker per task per visible GPU (pinned with CUDA_VISIBLE_DEVICES,
             as `fleet workers` does), or one per task on a CPU-only machine with
             the cores divided between the workers that run at once
             (FLEET_TORCH_THREADS, OMP_NUM_THREADS); parallel when the models of
             every task fit in memory together, else sequential
    step     on every pass of the drive loop, with the ledger counts: start the
             workers of the tasks that have work (sequential: one task at a time,
             in run order, so a follow-up runs after the task it follows), restart
             one that died (backoff; not one that exited 2, a configuration error),
             stop a task's worker once its queue is drained (sequential)
    gate     the drive loop feeds a task (and looks for its missing workers) only
             while its workers are up or another process serves it
    close    warm shutdown (SIGTERM: the current batch finishes), SIGKILL after
             FLEET_LOCAL_WORKERS_STOP_GRACE; also on Ctrl-C, SIGTERM and errors

Each worker runs in its own process group, so a Ctrl-C at the terminal reaches
only `fleet`, which then stops the workers in order; a second Ctrl-C kills them
at once. Nothing is lost either way: a killed batch's items stay leased in the
ledger and go back to pending when the lease expires. Logs go to
FLEET_STATE_DIR/logs/<task>-<gpuN|cpu>.log.

The plan (parallel or sequential, GPUs, threads) is fleet.ops.workerplan's; the
process record, its start and the restart rule are fleet.ops.pool's, shared
with `fleet workers`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from config.settings import Settings
from config.taskconfig import TaskSpec
from fleet.ops.pool import WorkerProcess, log_file, term_as_exit
from fleet.ops.workercommand import worker_argv, worker_env, worker_name
from fleet.ops.workerplan import Counts, Plan, has_work, next_turn, open_items, plan_for, upstream

SCAN_EVERY_S = 1.0  # how often the workers' heartbeats are read (ready? served elsewhere?)
FRESH_S = 25.0  # a heartbeat older than this is a worker that is gone (they beat every 10 s)

Echo = Callable[[str], None]
T = TypeVar("T")


class LocalWorkersFailed(RuntimeError):
    """The run cannot finish: the only work left belongs to tasks whose worker
    could not start (exit 2: a missing model or a bad task config)."""


# -- the processes ------------------------------------------------------------------------------


@dataclass
class Worker(WorkerProcess):
    """One local worker process (fleet.ops.pool's record), and what the run wants of it."""

    ready: bool = False  # its heartbeat says its model is loaded
    wanted: bool = False  # should be running now


@dataclass
class LocalWorkers:
    """Starts, supervises and stops the workers of one run; see the module docstring.

    Use as a context manager around the drive loop, passing `gate` and
    `wrap(progress)` to producer.runner.run_until_done or producer.nightly.drive.
    `extra_env` adds environment variables to one task's workers (the demo's
    memory simulator). Raises LocalWorkersFailed from the loop when only the
    work of tasks whose worker cannot start is left.
    """

    specs: Sequence[TaskSpec]
    settings: Settings
    plan: Plan
    echo: Echo
    loglevel: str = "INFO"
    extra_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    workers: dict[str, list[Worker]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # exited 2: not restarted
    elsewhere: set[str] = field(default_factory=set)  # served by workers not ours
    current: str | None = None  # sequential: the task whose turn it is
    notes: dict[str, str] = field(default_factory=dict)  # task -> what its worker does now
    _last_scan: float = -1e9
    _names: set[str] = field(default_factory=set)  # every worker name used, before "%h"
    _started: bool = False
    _old_term: Any = None

    def __post_init__(self) -> None:
        logs = self.settings.state_dir / "logs"
        self.order = [s.name for s in self.specs]
        self.ups = upstream(self.specs)
        for name in self.order:
            self.workers[name] = [Worker(name, g, log_file(logs, name, g)) for g in self.plan.gpus]
            self.notes[name] = "waiting" if self.plan.mode == "sequential" else ""

    # -- the hooks the drive loop calls ------------------------------------------------

    def gate(self, task: str) -> bool:
        """Feed this task now? Yes while its workers are up, or another process serves it."""
        if task in self.elsewhere:
            return True
        return any(w.ready and w.alive() for w in self.workers.get(task, ()))

    def wrap(self, progress: Callable[[Counts], None] | None) -> Callable[[Counts], None]:
        """The drive loop's progress callback: first `step`, then `progress`."""

        def both(counts: Counts) -> None:
            self.step(counts)
            if progress is not None:
                progress(counts)

        return both

    def step(self, counts: Counts) -> None:
        """One supervision pass with the ledger counts of this run's tasks."""
        now = time.monotonic()
        if not self._started:
            self._started = True
            self._scan(force=True)
            self.echo(self._plan_line())
        self._reap(now)
        self._scan()
        if self.plan.mode == "parallel":
            for name in self.order:
                if name not in self.elsewhere | self.broken and has_work(counts, name, self.ups):
                    self._want(name)
        else:
            self._sequential(counts)
        for ws in self.workers.values():
            for w in ws:
                if w.wanted and not w.alive() and now >= w.next_start:
                    self._start(w)
        self._check_stuck(counts)

    # -- inside a pass ---------------------------------------------------------------------

    def _plan_line(self) -> str:
        p = self.plan
        where = f"{len(p.gpus)} GPU(s)" if p.gpus != (None,) else "the CPU"
        per = "task per GPU" if p.gpus != (None,) else "task"
        return (
            f"local workers: {p.mode}, one per {per} on {where}, {p.threads} torch thread(s) "
            f"each ({p.why}); logs in {self.settings.state_dir / 'logs'}"
        )

    def _sequential(self, counts: Counts) -> None:
        if self.current is not None and open_items(counts, self.current) == 0:
            self.echo(f"{self.current}: queue drained; stopping its worker")
            self._stop_task(self.current, note="done")
            self.current = None
        if self.current is None:
            self.current = next_turn(self.order, counts, skip=self.elsewhere | self.broken)
            if self.current is not None:
                self._want(self.current)

    def _want(self, task: str) -> None:
        for w in self.workers[task]:
            w.wanted = True

    def _start(self, w: Worker) -> None:
        w.name = worker_name(w.task, gpu=w.gpu)
        self._names.add(w.name.removesuffix("%h"))
        env = worker_env(self.settings, gpu=w.gpu)
        env["FLEET_TORCH_THREADS"] = env["OMP_NUM_THREADS"] = str(self.plan.threads)
        env["FLEET_PARENT_PID"] = str(os.getpid())  # it stops itself if `fleet` is killed
        env.update(self.extra_env.get(w.task, {}))
        # detached: its own process group, so Ctrl-C reaches only `fleet`
        pid = w.start(
            worker_argv(w.task, gpu=w.gpu, loglevel=self.loglevel, hostname=w.name),
            env,
            detach=True,
        )
        w.ready = False
        self._note(w.task, "worker starting")
        self.echo(
            f"{w.task}: starting a worker on {w.slot} (pid {pid}, loading its model); log {w.log}"
        )

    def _reap(self, now: float) -> None:
        for ws in self.workers.values():
            for w in ws:
                code = w.exited()
                if code is None:
                    continue
                w.ready = False
                if not w.wanted:
                    continue
                delay = w.after_exit(code, now, base=self.settings.restart_backoff)
                if delay is None:  # exit 2: a configuration error
                    w.wanted = False
                    self.broken.add(w.task)
                    self._note(w.task, "worker failed (configuration)")
                    self.echo(
                        f"{w.task}: its worker exited with {code}, a configuration error (see "
                        f"{w.log}; e.g. run `fleet models prepare`); not restarting it"
                    )
                    if self.current == w.task:
                        self.current = None
                    continue
                self._note(w.task, f"worker restarting (exit {code})")
                self.echo(
                    f"{w.task}: its worker on {w.slot} exited with {code}; restarting in "
                    f"{delay:.0f}s (log {w.log})"
                )

    def _scan(self, *, force: bool = False) -> None:
        """Read the workers' heartbeats: ours that are ready, tasks served elsewhere."""
        now = time.monotonic()
        starting = any(w.alive() and not w.ready for ws in self.workers.values() for w in ws)
        every = SCAN_EVERY_S if starting else 5 * SCAN_EVERY_S
        if not force and now - self._last_scan < every:
            return
        self._last_scan = now
        from wire.stats import redis_client, scan_workers

        try:
            client = redis_client(self.settings.redis_url())
            try:
                live = [s for s in scan_workers(client) if time.time() - s.updated_at < FRESH_S]
            finally:
                client.close()
        except Exception:  # a Redis blip: the drive loop's outage handling owns that
            return
        ours = {w.name.removesuffix("%h"): w for ws in self.workers.values() for w in ws if w.name}
        others: set[str] = set()
        for s in live:
            mine = next((w for p, w in ours.items() if s.worker.startswith(p)), None)
            if mine is None:
                if not any(s.worker.startswith(p) for p in self._names):
                    others.add(s.task)  # not one of ours, now or before a restart
            elif not mine.ready and mine.alive():
                mine.ready = True
                self._note(mine.task, "worker running")
                self.echo(f"{mine.task}: worker on {mine.slot} ready ({s.model}, tier {s.tier})")
        mine_alive = {w.task for ws in self.workers.values() for w in ws if w.alive()}
        for task in self.order:
            served = task in others and task not in mine_alive
            if served and task not in self.elsewhere:
                self.echo(f"{task}: already served by a running worker; not starting another")
                self._note(task, "served elsewhere")
            elif not served and task in self.elsewhere:
                self._note(task, "")
            if served:
                self.elsewhere.add(task)
            else:
                self.elsewhere.discard(task)

    def _check_stuck(self, counts: Counts) -> None:
        if not self.broken:
            return
        for name in self.order:
            if name in self.broken:
                continue
            if open_items(counts, name) or any(
                open_items(counts, u) for u in self.ups[name] - self.broken
            ):
                return  # other work can still go on
        left = {t: open_items(counts, t) for t in sorted(self.broken) if open_items(counts, t)}
        if left:
            logs = ", ".join(str(self.workers[t][0].log) for t in left)
            raise LocalWorkersFailed(
                "the work left belongs to tasks whose worker cannot start: "
                + ", ".join(f"{t} ({n} item(s) open)" for t, n in left.items())
                + f". Their logs ({logs}) say why, e.g. run `fleet models prepare`."
            )

    def _note(self, task: str, text: str) -> None:
        self.notes[task] = text

    # -- stopping --------------------------------------------------------------------------

    def _stop_task(self, task: str, *, note: str) -> None:
        for w in self.workers[task]:
            w.wanted = False
        self._note(task, "worker stopping")
        self._stop([w for w in self.workers[task] if w.alive()])
        self._note(task, note)

    def _stop(self, workers: Sequence[Worker]) -> None:
        """Warm shutdown, SIGKILL after the grace period; a Ctrl-C meanwhile kills at once."""
        for w in workers:
            w.signal(signal.SIGTERM, group=True)
        deadline = time.monotonic() + self.settings.local_workers_stop_grace
        try:
            for w in workers:
                if w.proc is None:
                    continue
                try:
                    w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.echo(
                        f"{w.task}: its worker did not stop within "
                        f"{self.settings.local_workers_stop_grace:g}s; killing it (its batch "
                        "goes back to pending when the lease expires)"
                    )
                    w.signal(signal.SIGKILL, group=True)
                    w.proc.wait()
        except BaseException:
            for w in workers:  # a second Ctrl-C: no waiting, no orphans
                w.signal(signal.SIGKILL, group=True)
                if w.proc is not None:
                    w.proc.wait()
            raise
        finally:
            for w in workers:
                w.proc, w.ready = None, False
                w.close_log()

    def close(self) -> None:
        """Stop every worker (warm shutdown, then kill after the grace period)."""
        running = [w for ws in self.workers.values() for w in ws if w.alive()]
        for ws in self.workers.values():
            for w in ws:
                w.wanted = False
        if running:
            self.echo(
                f"stopping {len(running)} local worker(s): current batches finish "
                f"(up to {self.settings.local_workers_stop_grace:g}s; Ctrl-C again kills them now)"
            )
            for name in {w.task for w in running}:
                self._note(name, "worker stopping")
            self._stop(running)
        for ws in self.workers.values():
            for w in ws:
                w.close_log()

    def __enter__(self) -> LocalWorkers:
        # SIGTERM (systemd, Kubernetes, kill) unwinds like Ctrl-C, so the workers are stopped.
        try:
            self._old_term = signal.signal(signal.SIGTERM, term_as_exit)
        except ValueError:  # not the main thread: the caller owns signals
            self._old_term = None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)


@contextmanager
def local_workers(
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    echo: Echo,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[LocalWorkers]:
    """LocalWorkers for these tasks with this machine's plan; stopped on the way out."""
    lw = LocalWorkers(specs, settings, plan_for(specs, settings), echo, extra_env=extra_env or {})
    with lw:
        yield lw


def wanted(flag: bool | None, settings: Settings) -> bool:
    """--local-workers/--no-local-workers, else FLEET_LOCAL_WORKERS (auto: on with the
    embedded servers). Call before the services are resolved: they fill in the URLs."""
    if flag is not None:
        return flag
    if settings.local_workers == "auto":
        return settings.embedded
    return settings.local_workers == "on"


def say(message: str) -> None:
    """Print a line above the live progress bars (stderr)."""
    from fleet.observe.display import console

    console.print(message, markup=False, highlight=False)


def drive_with_local_workers(
    specs: Sequence[TaskSpec],
    settings: Settings,
    drive: Callable[[Callable[[Counts], None], Callable[[str], bool] | None], T],
    *,
    enabled: bool,
    quiet: bool = False,
) -> T:
    """Call `drive(progress, gate)` under live progress bars, one per task of `specs`.

    With `enabled`, this machine's workers for `specs` are started around the
    call (`local_workers`) and stopped after it, also on errors and Ctrl-C:
    `progress` then also steps them and `gate` says which tasks to feed. Without,
    `gate` is None: the caller's workers serve the run. `quiet` hides the bars.
    Returns what `drive` returns.

    Raises:
        LocalWorkersFailed: the only work left belongs to tasks whose worker could not start.
    """
    from fleet.observe.display import run_progress

    names = [spec.name for spec in specs]
    if not enabled:
        with run_progress(names, quiet=quiet) as update:
            return drive(update, None)
    with (
        local_workers(specs, settings, echo=say) as lw,
        run_progress(names, quiet=quiet, workers=lw.notes) as update,
    ):
        return drive(lw.wrap(update), lw.gate)
