"""The finished-batch signal between workers and `fleet run`, on the real Redis."""

from __future__ import annotations

import threading
import time

import redis

from wire.keys import FINISHED as FINISHED_KEY
from wire.keys import FINISHED_KEEP
from wire.messages import signal_finished, wait_finished


def test_a_signal_wakes_the_waiting_driver_at_once(broker_url):
    client = redis.Redis.from_url(broker_url)
    timer = threading.Timer(0.3, signal_finished, args=(redis.Redis.from_url(broker_url), "intent"))
    started = time.monotonic()
    timer.start()
    got = wait_finished(client, timeout=5.0)
    waited = time.monotonic() - started
    assert got == ["intent"]
    assert waited < 2.0  # woken by the signal, not by the 5 s timeout


def test_a_burst_is_read_in_one_wake_and_the_list_stays_bounded(broker_url):
    client = redis.Redis.from_url(broker_url)
    for _ in range(FINISHED_KEEP + 50):
        signal_finished(client, "topic")
    assert client.llen(FINISHED_KEY) == FINISHED_KEEP
    got = wait_finished(client, timeout=1.0)
    assert len(got) == FINISHED_KEEP and set(got) == {"topic"}
    assert client.llen(FINISHED_KEY) == 0
    started = time.monotonic()
    assert wait_finished(client, timeout=0.2) == []  # nothing waiting: the timeout
    assert time.monotonic() - started >= 0.15


def test_a_run_over_many_tasks_fits_its_runs_row(db_url, broker_url, tmp_path):
    """`fleet run` (and `fleet demo`) over more task names than runs.task holds
    records "N tasks" there and the full list in its counts."""
    from sqlalchemy import select

    from config.settings import Settings
    from config.taskconfig import TaskSpec, TierSpec
    from db.engine import transaction
    from db.schema import Run
    from producer.runner import run_until_done
    from wire.app import create_app

    settings = Settings(database_url=db_url, broker_url=broker_url, state_dir=tmp_path / "state")
    tier = (TierSpec(name="m", path="m"),)
    names = [f"a_rather_long_task_name_{i}" for i in range(7)]
    specs = [TaskSpec(n, "fake", "conversation", tier) for n in names]
    report = run_until_done(db_url, create_app(settings), specs, settings, timeout=30)
    assert not report.timed_out
    with transaction(db_url) as s:
        run = s.execute(select(Run).where(Run.id == report.run_id)).scalar_one()
    assert run.task == "7 tasks" and run.finished_at is not None
    assert run.counts["task_names"] == names
