"""`fleet run --local-workers`: one command starts, supervises and stops the
workers a run needs (real `celery worker` processes, real Postgres and Redis).

Every test watches the `fleet` process's children with psutil while it runs:
which workers were alive at once, what they were given, and that every one of
them is gone when `fleet` returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.support import (
    REPO,
    conversations,
    run_fleet,
    sigint_as_at_a_terminal,
    status_counts,
    write_jsonl,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 48


def _config(tmp: Path, *, slow: float = 0.0) -> Path:
    """intent (followed by review) and topic: tiny real classifiers, or with `slow`
    the fake model sleeping that many seconds per item (on a real model folder)."""
    kind = f'kind = "fake"\nseconds_per_item = {slow}\n' if slow else 'kind = "sequence_classify"\n'

    def task(name: str, path: str, then: str = "") -> str:
        return (
            f"[tasks.{name}]\n{kind}"
            'source = "conversation"\n'
            f"{then}"
            f"[[tasks.{name}.ladder]]\n"
            f'name = "{path}"\npath = "{path}"\nmax_length = 128\nmax_batch_tokens = 4096\n'
        )

    path = tmp / "local.toml"
    path.write_text(
        "include_bundled = false\n"
        + task("intent", "tiny-big", 'then = ["review"]\n')
        + task("review", "tiny-small")
        + task("topic", "tiny-small")
    )
    return path


@dataclass
class Watched:
    """What was seen of a `fleet` command's worker children while it ran."""

    proc: subprocess.Popen[str]
    workers: dict[int, dict[str, str]] = field(default_factory=dict)  # pid -> task, threads
    most_at_once: int = 0
    widest: list[tuple[int, str]] = field(default_factory=list)  # the most workers seen at once
    stdout: str = ""
    stderr: str = ""

    def sample(self) -> None:
        try:
            # The workers are direct children; what a worker forks for a moment (a
            # subprocess before its exec) still shows the worker's command line.
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return
        alive: list[tuple[int, str]] = []
        for c in children:
            try:
                cmd = c.cmdline()
                if "celery" not in cmd or c.status() == psutil.STATUS_ZOMBIE:
                    continue
                alive.append((c.pid, " ".join(cmd[-12:])))
                if c.pid not in self.workers:
                    env = c.environ()
                    queue = cmd[cmd.index("-Q") + 1]
                    self.workers[c.pid] = {
                        "task": queue.removeprefix("fleet."),
                        "threads": env.get("FLEET_TORCH_THREADS", ""),
                        "omp": env.get("OMP_NUM_THREADS", ""),
                        "pgid": str(os.getpgid(c.pid)),
                    }
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        if len(alive) > self.most_at_once:
            self.most_at_once, self.widest = len(alive), alive

    def none_left(self) -> list[int]:
        """Worker pids still running (zombies count as gone)."""
        left = []
        for pid in self.workers:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left


def _start(args: list[str], env: dict[str, str]) -> Watched:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: a Ctrl-C is sent to it as a terminal would
        preexec_fn=sigint_as_at_a_terminal,
    )
    return Watched(proc)


def _watch(w: Watched, *, timeout: float = 240, until: object = None) -> Watched:
    """Sample the children until `fleet` exits (or `until()` is true: return early)."""
    deadline = time.monotonic() + timeout
    while w.proc.poll() is None:
        w.sample()
        if until is not None and until():  # type: ignore[operator]
            return w
        assert time.monotonic() < deadline, "fleet did not finish in time"
        time.sleep(0.1)
    w.stdout, w.stderr = w.proc.communicate()
    return w


def _ingest(fleet, env: dict[str, str], n: int = N) -> None:
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(n))
    run_fleet(["ingest", "conversations", str(path)], env)


def _env(fleet, config: Path, **extra: str) -> dict[str, str]:
    return {**fleet.env, "FLEET_CONFIG_FILE": str(config), "FLEET_LEASE_SECONDS": "30", **extra}


def _first_last(url: str, task: str) -> tuple[float, float]:
    with transaction(url) as s:
        lo, hi = s.execute(
            text(
                "SELECT extract(epoch FROM min(r.created_at)), extract(epoch FROM max(r.created_at)) "
                "FROM results r JOIN work_items w ON w.id = r.work_item_id WHERE w.task = :t"
            ),
            {"t": task},
        ).one()
    return float(lo), float(hi)


def test_run_starts_the_workers_it_needs_and_stops_them(fleet):
    """Two tasks and a follow-up: a worker each, at once, the cores divided
    between them, each in its own process group; all gone at the end."""
    env = _env(fleet, _config(fleet.tmp))
    _ingest(fleet, env)
    w = _watch(_start(["run", "-t", "intent", "-t", "topic", "--local-workers", "--json"], env))
    assert w.proc.returncode == 0, w.stderr
    report = json.loads(w.stdout)
    for task in ("intent", "topic", "review"):  # review follows intent
        assert report["counts"][task] == {"done": N}, report
    assert "local workers: parallel" in w.stderr
    assert sorted(v["task"] for v in w.workers.values()) == ["intent", "review", "topic"]
    assert w.most_at_once == 3
    cores = len(os.sched_getaffinity(0))
    for v in w.workers.values():
        assert v["threads"] == v["omp"] == str(max(1, cores // 3))
    assert len({v["pgid"] for v in w.workers.values()}) == 3  # a process group each
    assert w.none_left() == []
    logs = fleet.tmp / "state" / "logs"
    assert {p.name for p in logs.glob("*.log")} == {
        "intent-cpu.log",
        "review-cpu.log",
        "topic-cpu.log",
    }
    assert " ready." in (logs / "review-cpu.log").read_text()


def test_ctrl_c_stops_every_worker_and_loses_nothing(fleet):
    """SIGINT to the process group of `fleet run` (a Ctrl-C at the terminal) in
    the middle of the run: the workers stop (warm shutdown), no process is left,
    the run exits as interrupted; a second run finishes every item once."""
    env = _env(fleet, _config(fleet.tmp, slow=0.1), FLEET_BATCH_SIZE="4")
    _ingest(fleet, env)
    args = ["run", "-t", "intent", "--local-workers", "--json", "--timeout", "240"]

    def midway() -> bool:
        done = status_counts(fleet.db_url, "intent").get("done", 0)
        return 8 <= done < N

    w = _watch(_start(args, env), until=midway)
    assert w.proc.poll() is None, f"the run ended before it could be interrupted:\n{w.stderr}"
    assert {v["task"] for v in w.workers.values()} == {"intent", "review"}
    os.killpg(w.proc.pid, signal.SIGINT)
    _watch(w, timeout=120)
    assert w.proc.returncode != 0
    assert "stopping 2 local worker(s)" in w.stderr, w.stderr
    assert w.none_left() == [], f"orphan workers: {w.none_left()}"
    before = status_counts(fleet.db_url, "intent")
    assert before.get("done", 0) < N, before  # it really was stopped in the middle

    again = _watch(_start(args, env))
    assert again.proc.returncode == 0, again.stderr
    assert again.none_left() == []
    for task in ("intent", "review"):
        assert status_counts(fleet.db_url, task) == {"done": N}
    with transaction(fleet.db_url) as s:
        per_item = s.execute(
            text("SELECT count(*) FROM results GROUP BY work_item_id HAVING count(*) > 1")
        ).all()
    assert per_item == []  # each item finished once


def test_sequential_under_a_memory_limit(fleet):
    """A memory cap that holds one worker, not two: one task at a time, a
    worker started when its queue has work and stopped when it is drained, the
    follow-up after the task it follows."""
    env = _env(fleet, _config(fleet.tmp), FLEET_LOCAL_WORKERS_MEMORY_MB="1000")
    _ingest(fleet, env)
    w = _watch(_start(["run", "-t", "intent", "--local-workers"], env))
    assert w.proc.returncode == 0, w.stderr
    assert "local workers: sequential" in w.stderr and "does not fit 1,000 MiB" in w.stderr
    assert w.most_at_once == 1, (w.widest, w.stderr)
    assert sorted(v["task"] for v in w.workers.values()) == ["intent", "review"]
    cores = len(os.sched_getaffinity(0))
    assert {v["threads"] for v in w.workers.values()} == {str(cores)}  # alone: every core
    for task in ("intent", "review"):
        assert status_counts(fleet.db_url, task) == {"done": N}
        assert f"{task}: queue drained; stopping its worker" in w.stderr
    intent, review = (_first_last(fleet.db_url, t) for t in ("intent", "review"))
    assert intent[1] < review[0]  # the follow-up ran after the task it follows
    assert w.none_left() == []


def test_workers_stop_by_themselves_when_fleet_is_killed(fleet):
    """`fleet run` SIGKILLed mid-run cannot stop its workers: each notices its
    parent is gone and stops with a warm shutdown (its batch finished, none left
    running; the Ctrl-C test shows a new run finishing the rest)."""
    env = _env(fleet, _config(fleet.tmp, slow=0.1), FLEET_BATCH_SIZE="4")
    _ingest(fleet, env)
    args = ["run", "-t", "intent", "--local-workers", "--json", "--timeout", "240"]

    def midway() -> bool:
        return 8 <= status_counts(fleet.db_url, "intent").get("done", 0) < N

    w = _watch(_start(args, env), until=midway)
    assert w.proc.poll() is None and len(w.workers) == 2
    os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while w.none_left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert w.none_left() == [], "workers outlived the fleet process that started them"
    logs = (fleet.tmp / "state" / "logs" / "intent-cpu.log").read_text()
    assert "that started this worker is gone; stopping (warm shutdown)" in logs
    for task in ("intent", "review"):
        assert "running" not in status_counts(fleet.db_url, task)


def test_nightly_with_local_workers(fleet):
    """`fleet nightly --local-workers`: one command on one machine runs the task
    and its follow-up to the end, closes the nightly run and leaves no worker."""
    env = _env(fleet, _config(fleet.tmp))
    _ingest(fleet, env)
    w = _watch(_start(["nightly", "--task", "intent", "--local-workers", "--json"], env))
    assert w.proc.returncode == 0, w.stderr
    report = json.loads(w.stdout)
    assert report["counts"] == {"intent": {"done": N}, "review": {"done": N}}
    assert sorted(v["task"] for v in w.workers.values()) == ["intent", "review"]
    assert w.none_left() == []
    with transaction(fleet.db_url) as s:
        trigger, finished = s.execute(
            text("SELECT trigger, finished_at FROM runs WHERE id = :i"), {"i": report["run_id"]}
        ).one()
    assert trigger == "nightly" and finished is not None
