"""A run's exit status and its runs row are what the run did: an old failed
item does not make every nightly run exit 1; `fleet park` acknowledges items
that will never succeed and `fleet retry --status parked` puts them back.
Real Postgres and Redis, the `fleet` command as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from db import ledger
from db.engine import transaction
from tests.support import (
    conversations,
    fleet_env,
    run_fleet,
    status_counts,
    tasks_toml,
    write_jsonl,
)


@pytest.fixture
def env(db_url: str, broker_url: str, tmp_path: Path) -> dict[str, str]:
    config = tasks_toml(tmp_path / "tasks.toml", [{"name": "m", "path": "m"}])
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_CONFIG_FILE": str(config),
            "FLEET_LOCAL_WORKERS": "off",
        }
    )
    path = write_jsonl(tmp_path / "c.jsonl", conversations(3))
    run_fleet(["ingest", "conversations", str(path)], env)
    with transaction(db_url) as s:
        assert ledger.discover(s, task="intent", source_kind="conversation") == 3
        # Three items that were done or failed by a run two days ago.
        s.execute(
            text(
                "UPDATE work_items SET status = CASE WHEN id = (SELECT min(id) FROM work_items) "
                "THEN 'failed' ELSE 'done' END, last_error = CASE WHEN id = (SELECT min(id) "
                "FROM work_items) THEN 'unreadable' END, updated_at = now() - interval '2 days'"
            )
        )
        s.execute(text("TRUNCATE work_queue"))  # finished: no longer waiting for a claim
    return env


def _last_run_counts(url: str) -> dict:
    with transaction(url) as s:
        return s.execute(text("SELECT counts FROM runs ORDER BY id DESC LIMIT 1")).scalar_one()


def test_a_nightly_run_with_nothing_to_do_exits_0_despite_old_failures(env, db_url):
    proc = run_fleet(["nightly", "--timeout", "60", "--json"], env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["counts"] == {"intent": {}}  # the run's own work: nothing
    assert out["ledger"] == {"intent": {"done": 2, "failed": 1}}
    counts = _last_run_counts(db_url)
    assert counts["tasks"] == {"intent": {}} and counts["ledger"]["intent"]["failed"] == 1

    text_run = run_fleet(["nightly", "--timeout", "60"], env, check=False)
    assert text_run.returncode == 0, text_run.stderr
    assert "1 older failed or dead item(s)" in text_run.stderr and "fleet park" in text_run.stderr
    assert "sync: no [sources.<name>] declared; nothing synced" in text_run.stdout


def test_park_acknowledges_and_retry_puts_back(env, db_url):
    parked = run_fleet(["park", "--status", "failed", "--task", "intent"], env)
    assert "1 item(s) parked" in parked.stdout
    assert status_counts(db_url, "intent") == {"done": 2, "parked": 1}
    with transaction(db_url) as s:
        error, age = s.execute(
            text(
                "SELECT last_error, now() - updated_at > interval '1 day' FROM work_items "
                "WHERE status = 'parked'"
            )
        ).one()
    assert error == "unreadable" and age  # the reason stays; parking is not work
    backlog = json.loads(run_fleet(["backlog", "--json"], env).stdout)
    assert backlog == {"intent": {"done": 2, "parked": 1}}
    # A parked item is not run again by the nightly run, and is not an older failure.
    night = run_fleet(["nightly", "--timeout", "60"], env, check=False)
    assert night.returncode == 0 and "older failed" not in night.stderr
    back = run_fleet(["retry", "--status", "parked"], env)
    assert "1 item(s) back to pending" in back.stdout
    assert status_counts(db_url, "intent") == {"done": 2, "pending": 1}


def test_park_refuses_an_unknown_task(env):
    proc = run_fleet(["park", "--status", "dead", "--task", "nope"], env, check=False)
    assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr
