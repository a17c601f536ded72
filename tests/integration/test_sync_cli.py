"""`fleet sync` and `fleet rerun` through the CLI (click's CliRunner) on the real
Postgres, with an application database of its own."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.engine import transaction
from fleet.cli import main
from tests.appdb import QUERY, add_conversation, create_app_database, sql
from tests.support import drop_database


@pytest.fixture
def cli_env(db_url, broker_url, tmp_path, monkeypatch) -> Iterator[tuple[str, Path]]:
    name, app_url, plain = create_app_database()
    config = tmp_path / "tasks.toml"
    config.write_text(
        'include_bundled = false\n[tasks.intent]\nkind = "fake"\nsource = "conversation"\n'
        '[[tasks.intent.ladder]]\nname = "fake"\npath = "fake"\n'
        f"[sources.app]\nshape = \"messages\"\nquery = '''{QUERY}'''\n"
        'trigger_tables = ["app.conversations", "app.messages"]\n'
        '[sources.broken]\nquery = "SELECT * FROM app.nope"\n'
    )
    for key in [k for k in os.environ if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("BROKER_URL", broker_url)
    monkeypatch.setenv("FLEET_SOURCE_DATABASE_URL", app_url)
    monkeypatch.setenv("FLEET_CONFIG_FILE", str(config))
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    try:
        yield plain, config
    finally:
        drop_database(name)


def test_sync_json_then_incremental(cli_env):
    plain, _ = cli_env
    add_conversation(plain, 1, [("user", "hello"), ("assistant", "hi")])
    add_conversation(plain, 2, [("user", "bye")])
    first = CliRunner().invoke(main, ["sync", "--source", "app", "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)[0]
    assert (report["source"], report["full"], report["new"], report["records"]) == (
        "app",
        True,
        2,
        2,
    )
    sql(
        plain,
        "INSERT INTO app.messages (conversation_id, seq, role, body) VALUES (2, 1, 'user', 'one more')",
    )
    second = CliRunner().invoke(main, ["sync", "-s", "app"])
    assert second.exit_code == 0, second.output
    assert "app: incremental" in second.output and "1 changed" in second.output


def test_sync_errors_say_what_to_fix(cli_env):
    bad = CliRunner().invoke(main, ["sync", "--source", "broken"])
    assert bad.exit_code == 2 and "source 'broken': the query failed" in bad.output
    assert "app.nope" in bad.output
    unknown = CliRunner().invoke(main, ["sync", "--source", "nope"])
    assert (
        unknown.exit_code == 2 and "unknown source(s) nope; declared: app, broken" in unknown.output
    )


def test_no_sources_declared(cli_env, tmp_path, monkeypatch):
    plain_config = tmp_path / "plain.toml"
    plain_config.write_text(
        '[tasks.intent]\nkind = "fake"\n[[tasks.intent.ladder]]\nname = "fake"\npath = "fake"\n'
    )
    monkeypatch.setenv("FLEET_CONFIG_FILE", str(plain_config))
    result = CliRunner().invoke(main, ["sync"])
    assert result.exit_code == 2 and "no [sources.<name>]" in result.output


def test_install_and_remove_triggers(cli_env):
    result = CliRunner().invoke(main, ["sync", "-s", "app", "--install-triggers"])
    assert result.exit_code == 0, result.output
    assert "marks changes to app.conversations, app.messages" in result.output
    assert "set FLEET_SYNC_SECONDS" in result.output
    plain, _ = cli_env
    add_conversation(plain, 5, [("user", "x")])
    assert sql(plain, "SELECT DISTINCT source FROM fleet_source_marks") == [("app",)]
    removed = CliRunner().invoke(main, ["sync", "-s", "app", "--remove-triggers"])
    assert removed.exit_code == 0 and "triggers removed from app.conversations" in removed.output


def test_rerun_needs_a_known_revision(cli_env):
    result = CliRunner().invoke(main, ["rerun", "--task", "intent"])
    assert result.exit_code == 2 and "pass --model-not REVISION" in result.output
    ok = CliRunner().invoke(main, ["rerun", "--task", "intent", "--model-not", "x", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["items"] == 0
    bad_date = CliRunner().invoke(
        main, ["rerun", "-t", "intent", "--model-not", "x", "--since", "yesterday"]
    )
    assert bad_date.exit_code == 2 and "is not a date or time" in bad_date.output


def test_backlog_names_fleet_sync_and_counts_rows_not_discovered(cli_env):
    plain, _ = cli_env
    empty = CliRunner().invoke(main, ["backlog"])
    assert empty.exit_code == 0 and "no work items yet: `fleet sync`" in empty.output
    add_conversation(plain, 1, [("user", "hello")])
    add_conversation(plain, 2, [("user", "bye")])
    assert CliRunner().invoke(main, ["sync", "-s", "app"]).exit_code == 0
    shown = CliRunner().invoke(main, ["backlog"])
    assert "source app: synced" in shown.output and "2 rows not discovered yet" in shown.output
    status = CliRunner().invoke(main, ["status", "--json"])
    assert json.loads(status.output)["sources"]["app"]["rows_not_discovered"] == 2


def test_a_failing_source_does_not_stop_the_others_and_exits_2(cli_env):
    plain, _ = cli_env
    add_conversation(plain, 1, [("user", "hello")])
    result = CliRunner().invoke(main, ["sync", "--json"])
    assert result.exit_code == 2
    reports = {r["source"]: r for r in json.loads(result.stdout)}
    assert reports["app"]["new"] == 1 and reports["app"]["error"] is None
    assert "app.nope" in reports["broken"]["error"]


def test_nightly_says_what_its_sync_did(cli_env, db_url):
    plain, _ = cli_env
    add_conversation(plain, 1, [("user", "hello"), ("assistant", "hi")])
    add_conversation(plain, 2, [("user", "my report is late")])
    result = CliRunner().invoke(main, ["nightly", "--timeout", "3"])
    assert result.exit_code == 4, result.output  # no worker: the items wait; the sync ran
    assert re.search(r"sync app: 2 new, 0 changed, 0 unchanged, 0 gone in \d+\.\ds", result.output)
    assert "sync broken: FAILED" in result.output and "`fleet sync` to retry" in result.output
    with transaction(db_url) as s:
        counts = s.execute(text("SELECT counts FROM runs ORDER BY id DESC LIMIT 1")).scalar_one()
    assert counts["synced"]["app"]["new"] == 2 and "error" in counts["synced"]["broken"]
    assert counts["discovered"] == {"intent": 2}
