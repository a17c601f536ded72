"""The queue accepts JSON only: a pickle-serialized message is rejected and
logged, executes nothing, and the worker goes on with the next batch."""

from __future__ import annotations

import pickle
import time

import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.support import conversations, run_fleet, status_counts, write_jsonl

pytestmark = pytest.mark.e2e


class Boom:
    """Unpickling this would run os.system: it must never be unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/fleet-pickle-was-executed",))


def test_pickle_message_is_rejected_and_the_worker_goes_on(fleet, tmp_path):
    marker = "/tmp/fleet-pickle-was-executed"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    worker = fleet.worker()
    worker.wait_ready()
    with Connection(fleet.broker_url) as conn:
        producer = Producer(conn)
        queue = Queue(
            "fleet.intent", Exchange("fleet.intent", type="direct"), routing_key="fleet.intent"
        )
        producer.publish(
            pickle.dumps(
                ((), {"task": "intent", "batch_id": "x", "item_ids": [1], "payload": Boom()}, {})
            ),
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "fleet.run_batch", "id": "evil-1", "lang": "py"},
            exchange=queue.exchange,
            routing_key="fleet.intent",
            declare=[queue],
        )
    path = write_jsonl(tmp_path / "c.jsonl", conversations(40))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    run_fleet(["enqueue", "-t", "intent"], fleet.env)
    deadline = time.monotonic() + 120
    while status_counts(fleet.db_url, "intent").get("done", 0) < 40:
        assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
        time.sleep(0.2)
    log = worker.log.read_text()
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log
    assert not os.path.exists(marker)
    assert worker.proc is not None and worker.proc.poll() is None  # still serving
