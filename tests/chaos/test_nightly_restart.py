"""`fleet nightly` rides out a Postgres restart: the run's lock connection dies
with the server, the driver waits, takes its lock again and finishes the run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import text

from tests.chaos.conftest import make_fleet
from tests.support import REPO, conversations, run_fleet, status_counts, write_jsonl

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

N = 600


def test_fleet_nightly_survives_a_postgres_restart_and_closes_its_run(
    servers, tiny_models, tmp_path
):
    from db.engine import dispose_all, transaction

    fleet = make_fleet(servers.db_url, servers.broker_url, tiny_models, tmp_path)
    path = write_jsonl(tmp_path / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    worker = fleet.worker()
    worker.wait_ready()
    out, err = tmp_path / "nightly.out", tmp_path / "nightly.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "nightly", "--timeout", "240", "--json"],
        env=fleet.env,
        cwd=REPO,
        stdout=out.open("w"),
        stderr=err.open("w"),
    )
    try:
        fleet.wait_done("intent", N // 5, timeout=120)
        servers.pg.restart(mode="immediate", down_seconds=5)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fleet.close()
    log = err.read_text()
    assert proc.returncode == 0, f"{out.read_text()}\n{log[-4000:]}"
    assert status_counts(servers.db_url, "intent") == {"done": N}
    assert "Postgres unreachable" in log and "Postgres reachable again" in log, log[-4000:]
    assert "the lock connection was lost; taking it again" in log, log[-4000:]
    assert "taken over" not in log
    dispose_all()
    with transaction(servers.db_url) as session:
        rows = session.execute(
            text("SELECT trigger, finished_at, counts FROM runs ORDER BY id")
        ).all()
    assert len(rows) == 1, rows
    trigger, finished_at, counts = rows[0]
    assert trigger == "nightly" and finished_at is not None
    assert counts["interrupted"] is False and counts["timed_out"] is False
    assert counts["tasks"]["intent"] == {"done": N}, json.dumps(counts)
