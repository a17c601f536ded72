"""Redis and Postgres die mid-run and come back; the fleet recovers on its own.

Both servers are throwaway ones (tests/chaos/servers.py) on their own ports:
Redis is SIGKILLed and started again empty (no persistence: every queued and
unacknowledged message is gone); Postgres is stopped with `pg_ctl stop -m
immediate` (no checkpoint, crash recovery on start) and started again on the
same data folder. The test does nothing else: the workers and `fleet run`
must reconnect, and the reconciler must bring back whatever was lost.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.chaos.conftest import make_fleet
from tests.support import (
    conversations,
    result_count_per_item,
    run_fleet,
    status_counts,
    write_jsonl,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

N = 2000


def _wait_queued(broker_url: str, *, at_least: int, timeout: float = 60) -> None:
    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    try:
        while client.llen("fleet.intent") < at_least:
            assert time.monotonic() < deadline, "the queue never held a backlog"
            time.sleep(0.01)
    finally:
        client.close()


def _start(servers, tiny_models, tmp_path):
    """N conversations ingested and two workers ready on the throwaway servers."""
    # Fixed-size messages, eight in flight: the queue holds a backlog of messages for the
    # Redis restart to lose (messages sized to a second of work leave few waiting).
    fleet = make_fleet(
        servers.db_url,
        servers.broker_url,
        tiny_models,
        tmp_path,
        FLEET_MAX_INFLIGHT_BATCHES="8",
        FLEET_BATCH_SECONDS="0",
    )
    path = write_jsonl(tmp_path / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    workers = [fleet.worker(), fleet.worker()]
    for w in workers:
        w.wait_ready()
    return fleet, workers


def test_redis_then_postgres_die_mid_run_and_the_fleet_recovers_by_itself(
    servers, tiny_models, tmp_path
):
    fleet, workers = _start(servers, tiny_models, tmp_path)
    try:
        run = fleet.run(timeout=280)
        fleet.wait_done("intent", N // 5, timeout=120)
        _wait_queued(servers.broker_url, at_least=2)  # messages in Redis that will be lost
        servers.redis.restart(down_seconds=10)  # SIGKILL, 10 s down, back empty
        at_redis = status_counts(servers.db_url, "intent").get("done", 0)
        fleet.wait_done("intent", at_redis + N // 5, timeout=180)  # going again
        servers.pg.restart(mode="immediate", down_seconds=5)  # no checkpoint: crash recovery
        code, out, err = fleet.wait_run(run, timeout=300)
        logs = fleet.logs()
        alive = [w.proc is not None and w.proc.poll() is None for w in workers]
    finally:
        fleet.close()
    assert code == 0, f"fleet run exited {code}\n{out}\n{err[-4000:]}"
    assert status_counts(servers.db_url, "intent") == {"done": N}
    per_item = result_count_per_item(servers.db_url, "intent")
    assert len(per_item) == N and set(per_item.values()) == {1}
    assert all(alive), logs[-4000:]  # the same worker processes all along
    assert all(w.log.read_text().count(" ready.") == 1 for w in workers)
    # The producer waited each outage out and said so; the lost messages' items came
    # back through the reconciler; each worker's consumer reconnected by itself.
    for said in (
        "Redis unreachable",
        "Redis reachable again",
        "expired leases back to pending",
        "Postgres unreachable",
        "Postgres reachable again",
    ):
        assert said in err, f"{said!r} not in fleet run's log:\n{err[-4000:]}"
    assert logs.count("Connection to broker lost") >= len(workers), logs[-4000:]
