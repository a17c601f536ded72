"""KEDA scales each task's workers on LLEN of the Redis list its ScaledObject
names: that list must be where the producer's batches for the task really wait
(kombu's Redis transport keeps a queue as a list named after it)."""

from __future__ import annotations

from pathlib import Path

import redis
import yaml
from kombu import pools

from config.settings import Settings
from producer.enqueue import queue_depth
from wire.app import create_app
from wire.messages import BatchMessage, send_batch

K8S_WORKERS = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "workers"


def keda_list_names() -> dict[str, str]:
    """task -> listName of its ScaledObject."""
    out = {}
    for path in sorted(K8S_WORKERS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ScaledObject":
                (trigger,) = doc["spec"]["triggers"]
                out[doc["metadata"]["labels"]["gpu-fleet/task"]] = trigger["metadata"]["listName"]
    return out


def test_keda_list_holds_the_waiting_batches_of_its_task(broker_url):
    names = keda_list_names()
    assert {"intent", "transcribe"} <= set(names)
    app = create_app(
        Settings(database_url="postgresql://unused@127.0.0.1/x", broker_url=broker_url)
    )
    client = redis.Redis.from_url(broker_url)
    try:
        for n in range(3):
            send_batch(app, BatchMessage("intent", f"b{n}", (n,)))
        send_batch(app, BatchMessage("transcribe", "t0", (9,)))
        assert client.llen(names["intent"]) == 3
        assert client.llen(names["transcribe"]) == 1
        assert client.llen(names["topic"]) == 0
        # the producer's backpressure reads the same list
        assert queue_depth(app, names["intent"]) == 3
    finally:
        # kombu keeps one pool per broker URL for the whole process: reset it, so
        # the next test's app gets a fresh pool, not this closed one
        pools.reset()
        client.close()
