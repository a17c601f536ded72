"""A `fleet run` stopped with Ctrl-C or SIGTERM still closes its runs row, marked interrupted,
against the real Postgres and Redis (no worker: the run waits until the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.support import (
    REPO,
    conversations,
    fleet_env,
    run_fleet,
    sigint_as_at_a_terminal,
    status_counts,
    tasks_toml,
    write_jsonl,
)


def _runs(url: str) -> list[dict[str, Any]]:
    from db.engine import transaction

    with transaction(url) as s:
        rows = s.execute(text("SELECT id, trigger, finished_at, counts FROM runs ORDER BY id"))
        return [dict(r) for r in rows.mappings()]


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_closes_its_row_as_interrupted(
    db_url: str, broker_url: str, tiny_models: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    config = tasks_toml(tmp_path / "tasks.toml", [{"name": "tiny-small", "path": "tiny-small"}])
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(tiny_models),
            "FLEET_CONFIG_FILE": str(config),
            "FLEET_BATCH_SIZE": "8",
            "FLEET_MAX_INFLIGHT_BATCHES": "2",
        }
    )
    run_fleet(
        ["ingest", "conversations", str(write_jsonl(tmp_path / "c.jsonl", conversations(20)))], env
    )
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "run", "--task", "intent", "--no-local-workers"],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    try:
        _wait_for("run opened", lambda: _runs(db_url), 60)
        _wait_for("items queued", lambda: status_counts(db_url, "intent").get("queued"), 30)
        # Ctrl-C reaches the terminal's process group; systemd and Kubernetes send SIGTERM.
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode != 0, log.read_text()
    (run,) = _runs(db_url)
    assert run["trigger"] == "manual" and run["finished_at"] is not None, log.read_text()
    c = run["counts"]
    assert c["interrupted"] is True and c["timed_out"] is False
    assert c["task_names"] == ["intent"] and c["discovered"] == {"intent": 20}
    assert c["tasks"]["intent"].get("queued", 0) > 0
