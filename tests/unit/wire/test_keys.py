"""wire.keys: one spelling of every queue and `fleet:*` key, agreed by every reader."""

from __future__ import annotations

from config.taskconfig import load_tasks
from wire import control, keys
from wire.stats import worker_key
from workers.heartbeat import batch_key
from workers.lifecycle import queue_task


def test_every_task_queue_is_spelled_by_wire_keys():
    for spec in load_tasks(None).values():
        assert spec.queue == keys.task_queue(spec.name)
        assert keys.queue_task(spec.queue) == spec.name


def test_control_and_default_queues_carry_no_task():
    assert keys.queue_task(keys.CONTROL_QUEUE) is None
    assert keys.queue_task(keys.DEFAULT_QUEUE) is None
    assert keys.queue_task("celery") is None
    assert queue_task([keys.CONTROL_QUEUE]) is None
    assert queue_task([keys.task_queue("intent"), keys.DEFAULT_QUEUE]) == "intent"


def test_the_two_prefixes_are_distinct_and_used_by_their_writers():
    assert keys.WORKER_PREFIX != keys.BATCH_HOLDER_PREFIX
    assert worker_key("intent@gpu0.h") == "fleet:worker:intent@gpu0.h"
    assert batch_key("b1") == "fleet:batch:b1"
    assert keys.resume("b1", 2) == "fleet:resume:b1:2"


def test_fleet_info_reports_what_the_worker_hands_it():
    try:
        control.describe_with(None)
        idle = control.worker_info("intent@gpu0.h", [keys.task_queue("intent")])
        assert idle["role"] == "starting" and idle["model"] is None
        assert control.worker_info("control@h", [keys.CONTROL_QUEUE])["role"] == "control"
        control.describe_with(
            lambda: {"task": "intent", "model": "m", "tier": 0, "memory": {"reserved_mb": 1.0}}
        )
        info = control.worker_info("intent@gpu0.h", [keys.task_queue("intent")])
        assert info["role"] == "worker" and info["model"] == "m"
        assert info["memory"]["reserved_mb"] == 1.0 and "rss_mb" in info["memory"]
    finally:
        control.describe_with(None)
