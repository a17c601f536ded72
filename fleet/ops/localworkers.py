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

The memory estimate of a task is its first tier's `footprint_mb`, or 1.3 x its
weights on disk (as workers/runtime.py estimates it), plus what a worker
process holds before any model (Python, torch, a CUDA context).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from config.exitcodes import ExitCode
from config.settings import Settings
from config.taskconfig import TaskSpec, resolve_model_path
from fleet.ops.workercommand import worker_argv, worker_env, worker_name
from wire.retry import backoff

# What a worker holds besides 1.3 x its weights: the interpreter with torch and
# transformers (~450 MiB), activations and allocator slack. In the bundled nightly on
# the CPU the Whisper base worker's proportional set size (libtorch's pages shared
# between workers counted once) was 1.2 GiB, 0.8 GiB above 1.3 x its weights; on a
# GPU, a CUDA context.
PROCESS_MB = 700.0
MEMORY_SHARE = 0.85  # of the free memory, as workers.policy.start_tier leaves headroom
STABLE_AFTER_S = 60.0  # a worker up this long has its restart backoff reset
SCAN_EVERY_S = 1.0  # how often the workers' heartbeats are read (ready? served elsewhere?)
FRESH_S = 25.0  # a heartbeat older than this is a worker that is gone (they beat every 10 s)

Counts = dict[str, dict[str, int]]
Echo = Callable[[str], None]
T = TypeVar("T")


class LocalWorkersFailed(RuntimeError):
    """The run cannot finish: the only work left belongs to tasks whose worker
    could not start (exit 2: a missing model or a bad task config)."""


# -- the plan (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which local workers a run starts and how.

    mode: "parallel" or "sequential"; gpus: the GPU of each worker of a task
    ((None,) on a CPU-only machine); threads: torch threads per worker;
    need_mb: estimated MiB per task on one device (model and process);
    budget_mb: MiB the workers may take per device (None: unknown); why: one
    line for people.
    """

    mode: str
    gpus: tuple[int | None, ...]
    threads: int
    need_mb: dict[str, float]
    budget_mb: float | None
    why: str


def plan_workers(
    need_mb: Mapping[str, float],
    *,
    gpus: int,
    cores: int,
    budget_mb: float | None,
    mode: str = "auto",
) -> Plan:
    """Decide parallel or sequential, the GPUs and the torch threads per worker.

    need_mb: task -> estimated MiB of one worker (model + process); gpus: visible
    GPUs (0: CPU only); cores: CPU cores this process may use; budget_mb: MiB
    the workers may take on one device (None: unknown, taken as enough); mode:
    "auto", "parallel" or "sequential" (forced). Parallel needs the sum of every
    task's need to fit the budget, since a device holds one worker per task.
    """
    total = sum(need_mb.values())
    if mode == "auto":
        fits = budget_mb is None or total <= budget_mb
        mode = "parallel" if fits else "sequential"
        if budget_mb is None:
            why = "free memory unknown: every task at once"
        elif fits:
            why = f"~{total:,.0f} MiB for every task's worker at once fits {budget_mb:,.0f} MiB"
        else:
            why = (
                f"~{total:,.0f} MiB for every task's worker at once does not fit {budget_mb:,.0f} MiB: "
                "one task at a time"
            )
    else:
        why = f"FLEET_LOCAL_WORKERS_MODE={mode}"
    at_once = len(need_mb) if mode == "parallel" else 1
    per_device = max(at_once, 1) * max(gpus, 1)
    return Plan(
        mode=mode,
        gpus=tuple(range(gpus)) if gpus else (None,),
        threads=max(1, cores // per_device),
        need_mb=dict(need_mb),
        budget_mb=budget_mb,
        why=why,
    )


def open_items(counts: Counts, task: str) -> int:
    c = counts.get(task, {})
    return c.get("pending", 0) + c.get("queued", 0) + c.get("running", 0)


def upstream(specs: Sequence[TaskSpec]) -> dict[str, set[str]]:
    """task -> the tasks of this run it follows, directly or not (transcribe for audio_intent)."""
    direct = {s.name: {u.name for u in specs if s.name in u.then} for s in specs}
    out: dict[str, set[str]] = {}
    for name in direct:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += direct.get(u, set())
        out[name] = seen
    return out


def has_work(counts: Counts, task: str, ups: Mapping[str, set[str]]) -> bool:
    """A task needs its worker: items open, or a task it follows still has items open."""
    return open_items(counts, task) > 0 or any(open_items(counts, u) for u in ups.get(task, ()))


def next_turn(order: Sequence[str], counts: Counts, *, skip: set[str]) -> str | None:
    """Sequential mode: the first task in run order (follow-ups after the task they
    follow) with open items, leaving out `skip` (broken or served elsewhere)."""
    return next((t for t in order if t not in skip and open_items(counts, t) > 0), None)


# -- measuring this machine ------------------------------------------------------------------


def footprint_mb(spec: TaskSpec, models_dir: Path) -> float:
    """MiB the task's first tier takes: footprint_mb, else 1.3 x its weights on disk
    (workers/runtime.py's estimate), else 0 (no weights: a fake model or a missing one)."""
    from workers.device import weights_mb

    tier = spec.ladder[0]
    if tier.footprint_mb is not None:
        return float(tier.footprint_mb)
    path = resolve_model_path(tier, models_dir)
    weights = weights_mb(path) if path.is_dir() else None
    return weights * 1.3 if weights else 0.0


def mem_available_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gpu_free_mb() -> float | None:
    """The least free memory of the visible GPUs (nvidia-smi), in MiB."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        free = [float(x) for x in out.split() if x.strip()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return min(free) if free else None


def plan_for(specs: Sequence[TaskSpec], settings: Settings) -> Plan:
    """The plan for these tasks on this machine, under the settings."""
    from fleet.ops.supervisor import visible_gpus

    gpus = visible_gpus()
    need = {s.name: footprint_mb(s, settings.resolved_models_dir) + PROCESS_MB for s in specs}
    budget: float | None = settings.local_workers_memory_mb
    if budget is None:
        free = gpu_free_mb() if gpus else mem_available_mb()
        budget = free * MEMORY_SHARE if free is not None else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return plan_workers(
        need, gpus=gpus, cores=cores or 1, budget_mb=budget, mode=settings.local_workers_mode
    )


# -- the processes ------------------------------------------------------------------------------


@dataclass
class Worker:
    """One local worker process (restarted in place when it dies)."""

    task: str
    gpu: int | None
    log: Path
    name: str = ""
    proc: subprocess.Popen[bytes] | None = None
    out: IO[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    ready: bool = False
    wanted: bool = False  # should be running now

    @property
    def slot(self) -> str:
        return f"gpu{self.gpu}" if self.gpu is not None else "cpu"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


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
            self.workers[name] = [
                Worker(name, g, logs / f"{name}-{f'gpu{g}' if g is not None else 'cpu'}.log")
                for g in self.plan.gpus
            ]
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
        w.log.parent.mkdir(parents=True, exist_ok=True)
        if w.out is not None:
            w.out.close()
        w.out = w.log.open("ab")
        w.name = worker_name(w.task, gpu=w.gpu)
        self._names.add(w.name.removesuffix("%h"))
        env = worker_env(self.settings, gpu=w.gpu)
        env["FLEET_TORCH_THREADS"] = env["OMP_NUM_THREADS"] = str(self.plan.threads)
        env["FLEET_PARENT_PID"] = str(os.getpid())  # it stops itself if `fleet` is killed
        env.update(self.extra_env.get(w.task, {}))
        w.proc = subprocess.Popen(
            worker_argv(w.task, gpu=w.gpu, loglevel=self.loglevel, hostname=w.name),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=w.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches only `fleet`
        )
        w.started, w.ready = time.monotonic(), False
        self._note(w.task, "worker starting")
        self.echo(
            f"{w.task}: starting a worker on {w.slot} (pid {w.proc.pid}, loading its model); "
            f"log {w.log}"
        )

    def _reap(self, now: float) -> None:
        for ws in self.workers.values():
            for w in ws:
                if w.proc is None or w.proc.poll() is None:
                    continue
                code = w.proc.returncode
                w.proc, w.ready = None, False
                if not w.wanted:
                    continue
                if code == ExitCode.CONFIG:
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
                if now - w.started > STABLE_AFTER_S:
                    w.restarts = 0
                delay = backoff(
                    w.restarts, base=self.settings.restart_backoff, cap=60.0, jitter=False
                )
                w.restarts += 1
                w.next_start = now + delay
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
            _signal_group(w, signal.SIGTERM)
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
                    _signal_group(w, signal.SIGKILL)
                    w.proc.wait()
        except BaseException:
            for w in workers:  # a second Ctrl-C: no waiting, no orphans
                _signal_group(w, signal.SIGKILL)
                if w.proc is not None:
                    w.proc.wait()
            raise
        finally:
            for w in workers:
                w.proc, w.ready = None, False
                if w.out is not None:
                    w.out.close()
                    w.out = None

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
                if w.out is not None:
                    w.out.close()
                    w.out = None

    def __enter__(self) -> LocalWorkers:
        # SIGTERM (systemd, Kubernetes, kill) unwinds like Ctrl-C, so the workers are stopped.
        try:
            self._old_term = signal.signal(signal.SIGTERM, _term_as_exit)
        except ValueError:  # not the main thread: the caller owns signals
            self._old_term = None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)


def _term_as_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _signal_group(w: Worker, sig: int) -> None:
    if w.proc is None or w.proc.poll() is not None:
        return
    try:
        os.killpg(w.proc.pid, sig)
    except ProcessLookupError:
        pass


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
