"""CLI commands against the real Postgres and Redis (CliRunner, in process)."""

from __future__ import annotations

import json

import redis
from click.testing import CliRunner

from fleet.cli import main
from tests.support import conversations, status_counts, write_jsonl


def _env(db_url: str, broker_url: str, tmp_path) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "FLEET_STATE_DIR": str(tmp_path / "state"),
    }


def test_ingest_reports_bad_lines_and_keeps_the_rest(db_url, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(20))
    with path.open("ab") as f:
        f.write(b"{not json\n")
        f.write(b'{"external_id": "x1", "messages": [{"role": "user", "content": "\xff"}]}\n')
        f.write(b"\n")
        f.write(b'"just a string"\n')
        f.write(json.dumps(conversations(1, prefix="late")[0]).encode() + b"\n")
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["ingest", "conversations", str(path), "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["inserted"] == 21 and report["read"] == 24
    assert [b["line"] for b in report["bad"]] == [21, 22, 24]
    assert "not valid UTF-8" in report["bad"][1]["reason"]
    again = runner.invoke(
        main,
        ["ingest", "conversations", str(path), "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert json.loads(again.output)["already_present"] == 21


def test_enqueue_sends_ids_only(db_url, broker_url, tmp_path):
    env = _env(db_url, broker_url, tmp_path)
    runner = CliRunner()
    path = write_jsonl(tmp_path / "c.jsonl", conversations(50))
    assert runner.invoke(main, ["ingest", "conversations", str(path)], env=env).exit_code == 0
    dry = runner.invoke(main, ["enqueue", "-t", "intent", "--dry-run", "--json"], env=env)
    assert json.loads(dry.output)["items"] == 50
    assert status_counts(db_url, "intent") == {}  # dry run claims nothing
    result = runner.invoke(
        main, ["enqueue", "-t", "intent", "--limit", "40", "--batch-size", "16", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["items"], report["batches"]) == (40, 3)
    assert status_counts(db_url, "intent") == {"queued": 40, "pending": 10}
    client = redis.Redis.from_url(broker_url)
    raw = client.lrange("fleet.intent", 0, -1)
    assert len(raw) == 3
    for message in raw:
        envelope = json.loads(message)
        assert envelope["content-type"] == "application/json"
        assert envelope["headers"]["task"] == "fleet.run_batch"
        assert len(message) < 4000  # ids, never payloads
    backlog = runner.invoke(main, ["backlog", "--json"], env=env)
    assert json.loads(backlog.output) == {"intent": {"pending": 10, "queued": 40}}
