"""A nightly run under `fleet beat` feeds like `fleet nightly` and `fleet run`:
its ticks send messages sized by the workers' measured throughput (one Feeder,
producer.drive), not FLEET_BATCH_SIZE items each. Real Postgres and Redis."""

from __future__ import annotations

import base64
import io
import json
import time

import redis
from kombu import pools

from config.settings import Settings
from config.taskconfig import load_tasks
from producer import beat
from producer.drive import Feeder
from producer.ingest import ingest_conversations_file
from tests.support import conversations
from wire import keys
from wire.app import create_app
from wire.stats import WorkerStats

RATE = 200.0  # items/s one live intent worker reports


def _queued_sizes(client: redis.Redis, queue: str) -> list[int]:
    """Items of each batch message waiting in `queue` (kombu's Redis list)."""
    sizes = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        sizes.append(len(kwargs["item_ids"]))
    return sizes


def test_a_nightly_run_under_beat_sends_messages_sized_like_fleet_nightly(db_url, broker_url):
    settings = Settings(
        database_url=db_url,
        broker_url=broker_url,
        batch_size=16,
        batch_seconds=1.0,
        max_inflight_batches=2,
        config_file=None,
    )
    spec = load_tasks(None)["intent"]
    rows = "".join(json.dumps(r) + "\n" for r in conversations(1000))
    assert ingest_conversations_file(db_url, io.BytesIO(rows.encode())).inserted == 1000

    client = redis.Redis.from_url(broker_url)
    now = time.time()
    live = WorkerStats(
        worker="intent@gpu0-1.test",
        task="intent",
        pid=1,
        gpu="0",
        device="cuda:0",
        device_name="test",
        started_at=now,
        recent_items_per_s=RATE,
        updated_at=now,
    )
    client.set(keys.worker(live.worker), live.encode(), ex=60)
    app = create_app(settings)
    try:
        feeder = Feeder(settings)
        try:
            feeder._refresh()
            sized = feeder.batch_size("intent")
        finally:
            feeder.close()
        assert sized == int(RATE * settings.batch_seconds) > settings.batch_size

        got = beat.start(db_url, app, [spec], settings, holder="control@test", sync=False)

        assert got["sent_batches"] == 2
        assert _queued_sizes(client, keys.task_queue("intent")) == [sized, sized]
        # The next tick finds the queue full: backpressure, as in the drive loop.
        assert beat.tick(db_url, app, {"intent": spec}, settings)["sent_batches"] == 0
    finally:
        # kombu keeps one pool per broker URL for the whole process: reset it, so
        # the next test's app gets a fresh pool, not this closed one
        pools.reset()
        client.close()
