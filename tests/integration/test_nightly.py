"""The nightly job against the real Postgres and Redis with a real worker:
`fleet nightly` in the foreground, one run at a time, and `fleet beat`
(Celery beat + the control worker) driving a run through the control queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from config.settings import Settings
from tests.support import (
    REPO,
    WorkerProcess,
    conversations,
    fleet_env,
    run_fleet,
    status_counts,
    tasks_toml,
    write_jsonl,
)

N = 120


@dataclass
class Env:
    db_url: str
    broker_url: str
    tmp: Path
    env: dict[str, str]

    def worker(self, name: str = "intent@gpu0.%h") -> WorkerProcess:
        w = WorkerProcess("intent", self.env, self.tmp / f"{name.split('@')[0]}.log", name=name)
        return w.start()

    def ingest(self, n: int) -> None:
        path = write_jsonl(self.tmp / "c.jsonl", conversations(n))
        run_fleet(["ingest", "conversations", str(path)], self.env)


@pytest.fixture
def nightly_env(db_url: str, broker_url: str, tiny_models: Path, tmp_path: Path) -> Iterator[Env]:
    config = tasks_toml(
        tmp_path / "tasks.toml",
        [{"name": "tiny-small", "path": "tiny-small", "max_length": 64, "max_batch_tokens": 4096}],
    )
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(tiny_models),
            "FLEET_CONFIG_FILE": str(config),
            "FLEET_LEASE_SECONDS": "8",
            "FLEET_RECONCILE_INTERVAL": "1",
            "FLEET_MAX_INFLIGHT_BATCHES": "2",
            "FLEET_BATCH_SIZE": "16",
            "FLEET_BEAT_FEED_SECONDS": "1",
            "FLEET_BEAT_RECONCILE_SECONDS": "2",
        }
    )
    yield Env(db_url, broker_url, tmp_path, env)


def runs(url: str) -> list[dict[str, Any]]:
    from db.engine import transaction

    with transaction(url) as s:
        rows = s.execute(
            text("SELECT id, trigger, task, finished_at, counts FROM runs ORDER BY id")
        ).mappings()
        return [dict(r) for r in rows]


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout}s")


def popen_fleet(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", *args],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_beat_schedule_comes_from_the_settings():
    from celery.schedules import crontab

    from producer.schedule import ScheduleError, beat_schedule

    s = Settings(
        nightly_crontab="30 3 * * 1-5",
        timezone="Europe/Berlin",
        beat_reconcile_seconds=120,
        beat_feed_seconds=5,
    )
    sched = beat_schedule(s)
    nightly = sched["nightly"]
    assert nightly["task"] == "fleet.nightly"
    assert nightly["options"]["queue"] == "fleet.control"
    cron = nightly["schedule"]
    assert isinstance(cron, crontab)
    assert cron.minute == {30} and cron.hour == {3} and cron.day_of_week == {1, 2, 3, 4, 5}
    assert sched["reconcile"]["schedule"] == timedelta(seconds=120)
    assert sched["reconcile"]["task"] == "fleet.reconcile"
    assert sched["nightly-tick"]["schedule"] == timedelta(seconds=5)
    assert {e["options"]["queue"] for e in sched.values()} == {"fleet.control"}

    for bad, words in [
        ("0 2 * *", "needs 5 fields"),
        ("61 2 * * *", "not a valid crontab"),
    ]:
        with pytest.raises(ScheduleError, match=words):
            beat_schedule(Settings(nightly_crontab=bad))
    with pytest.raises(ScheduleError, match="not a known time zone"):
        beat_schedule(Settings(timezone="Mars/Olympus"))


@pytest.mark.parametrize(
    ("mode", "holder_alive", "idle_s", "abandoned"),
    [
        ("foreground", True, 10_000, False),  # its process holds the lock: alive, however quiet
        ("foreground", False, 0, True),  # lock free: the process is gone
        ("beat", False, 100, False),  # ticked recently
        ("beat", True, 1_000, True),  # no tick for longer than stale_after
    ],
)
def test_when_an_open_run_counts_as_abandoned(mode, holder_alive, idle_s, abandoned):
    from producer.runlock import OpenRun, is_abandoned

    now = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    run = OpenRun(7, now - timedelta(hours=5), mode, "h:1", now - timedelta(seconds=idle_s))
    got = is_abandoned(run, now=now, holder_alive=holder_alive, stale_after=900)
    assert got is abandoned


def test_a_nightly_run_covers_every_task_and_their_follow_ups():
    from config.taskconfig import load_tasks
    from producer.drive import run_specs
    from producer.runs import task_label

    tasks = load_tasks()
    assert [s.name for s in run_specs(tasks)] == list(tasks)
    assert [s.name for s in run_specs(tasks, ["transcribe"])] == ["transcribe", "audio_intent"]
    assert task_label([f"task{i:02d}" for i in range(20)]) == "20 tasks"


def test_sigterm_closes_the_run_row(nightly_env):
    e = nightly_env
    e.ingest(20)
    proc = popen_fleet(["nightly"], e.env, e.tmp / "term.log")  # no worker: it waits
    try:
        wait_for("run opened", lambda: runs(e.db_url), 60)
        wait_for("items queued", lambda: status_counts(e.db_url, "intent").get("queued"), 30)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signal.SIGTERM, (e.tmp / "term.log").read_text()
    (run,) = runs(e.db_url)
    assert run["finished_at"] is not None
    assert run["counts"]["interrupted"] is True and run["counts"]["discovered"] == {"intent": 20}


def test_beat_with_a_bad_crontab_fails_before_starting(nightly_env):
    env = dict(nightly_env.env, FLEET_NIGHTLY_CRONTAB="0 25 * * *")
    proc = run_fleet(["beat"], env, timeout=60, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "FLEET_NIGHTLY_CRONTAB='0 25 * * *' is not a valid crontab" in proc.stderr


def test_nightly_tasks_setting_names_the_tasks_and_a_typo_fails_before_starting(nightly_env):
    assert Settings(nightly_tasks=" intent, transcribe ,").nightly_task_names() == [
        "intent",
        "transcribe",
    ]
    assert Settings().nightly_task_names() == []
    env = dict(nightly_env.env, FLEET_NIGHTLY_TASKS="intent,intnet")
    for command in (["nightly"], ["beat"]):
        proc = run_fleet(command, env, timeout=60, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "intnet" in proc.stderr
    assert runs(nightly_env.db_url) == []


@pytest.mark.slow
def test_nightly_one_run_at_a_time_takes_over_an_abandoned_one_and_finishes(nightly_env):
    e = nightly_env
    e.ingest(N)
    # No worker yet: the first nightly run opens, discovers, queues a little and waits.
    first = popen_fleet(["nightly", "--timeout", "120"], e.env, e.tmp / "first.log")
    try:
        opened = wait_for("first run opened", lambda: runs(e.db_url), 60)
        assert opened[0]["trigger"] == "nightly" and opened[0]["finished_at"] is None
        first_id = opened[0]["id"]
        wait_for("items queued", lambda: status_counts(e.db_url, "intent").get("queued"), 30)

        second = run_fleet(["nightly", "--json"], e.env, timeout=120, check=False)
        assert second.returncode == 0, second.stderr
        reply = json.loads(second.stdout)
        assert reply["run_id"] is None and reply["still_going"] == first_id
        assert f"nightly run {first_id} (foreground" in reply["message"]
        assert "still going" in reply["message"]
        assert len(runs(e.db_url)) == 1

        # The first driver dies without cleaning up: its session lock goes with it.
        stop(first, signal.SIGKILL)
    finally:
        stop(first, signal.SIGKILL)

    worker = e.worker()
    try:
        worker.wait_ready()
        third = run_fleet(["nightly", "--json", "--timeout", "120"], e.env, timeout=180)
    finally:
        worker.stop()
    report = json.loads(third.stdout)
    # The ledger ends all done; the run's own work leaves out what the worker finished
    # (messages the abandoned run had queued) before this run opened.
    assert report["ledger"] == {"intent": {"done": N}}
    assert list(report["counts"]) == ["intent"] and 0 < report["counts"]["intent"]["done"] <= N
    assert status_counts(e.db_url, "intent") == {"done": N}

    old, new = runs(e.db_url)
    assert old["id"] == first_id and old["finished_at"] is not None
    assert old["counts"]["abandoned"] == "its process is gone"
    assert new["id"] == report["run_id"] and new["finished_at"] is not None
    assert new["trigger"] == "nightly" and new["task"] == "intent"
    c = new["counts"]
    assert c["mode"] == "foreground" and c["task_names"] == ["intent"]
    assert c["tasks"] == report["counts"] and c["ledger"] == {"intent": {"done": N}}
    assert c["discovered"] == {"intent": 0}  # the abandoned run discovered them
    assert c["timed_out"] is False and c["interrupted"] is False
    assert c["sent_batches"] >= 1


@pytest.mark.slow
def test_fleet_beat_drives_a_nightly_run_through_the_control_queue(nightly_env):
    from celery import Celery

    e = nightly_env
    e.ingest(N)
    worker = e.worker()
    beat = popen_fleet(["beat"], e.env, e.tmp / "beat.log")
    client = Celery("test-client", broker=e.broker_url, set_as_current=False)
    client.conf.update(task_serializer="json", accept_content=["json"])
    try:
        worker.wait_ready()
        wait_for(
            "control worker ready",
            lambda: "control@" in (log := (e.tmp / "beat.log").read_text()) and " ready." in log,
            90,
        )
        assert beat.poll() is None, (e.tmp / "beat.log").read_text()
        started = time.monotonic()
        client.send_task("fleet.nightly", queue="fleet.control")
        opened = wait_for("beat run opened", lambda: runs(e.db_url), 30)
        assert opened[0]["counts"]["mode"] == "beat"
        closed = wait_for(
            "beat run closed by a feed tick",
            lambda: [r for r in runs(e.db_url) if r["finished_at"] is not None],
            60,
        )
        seconds = time.monotonic() - started
        # A second nightly while none is open starts a run that closes at once (nothing new).
        client.send_task("fleet.nightly", queue="fleet.control")
        wait_for(
            "second beat run closed",
            lambda: len([r for r in runs(e.db_url) if r["finished_at"] is not None]) == 2,
            30,
        )
    finally:
        client.close()
        stop(beat)
        worker.stop()
    log = (e.tmp / "beat.log").read_text()
    run = closed[0]
    c = run["counts"]
    assert run["trigger"] == "nightly" and c["task_names"] == ["intent"]
    assert c["tasks"] == {"intent": {"done": N}} and c["discovered"] == {"intent": N}
    # Sized by the worker's measured throughput, as under `fleet nightly`: from
    # FLEET_BATCH_SIZE (16) up, so at most ceil(N / 16) messages (test_beat_feed pins sizes).
    assert c["timed_out"] is False and 1 <= c["sent_batches"] <= -(-N // 16)
    assert status_counts(e.db_url, "intent") == {"done": N}
    # The beat schedule sent ticks and reconciler passes to the control worker.
    assert "fleet.nightly_tick" in log and "fleet.reconcile" in log
    assert "loaded task=" not in log  # the control worker holds no model
    assert beat.returncode == 0, log[-3000:]
    print(
        f"\n[nightly] beat run of {N} items closed {seconds:.1f}s after the nightly task was sent"
    )
