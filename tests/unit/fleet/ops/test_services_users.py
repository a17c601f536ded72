"""Who still uses the embedded Redis: the per-process user files."""

from __future__ import annotations

import os
import subprocess
import sys

from fleet.ops.services import _other_live_users


def test_leaving_removes_own_file_and_counts_live_others(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / str(os.getpid())).touch()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (users / str(other.pid)).touch()
        assert _other_live_users(users) is True
        assert not (users / str(os.getpid())).exists()
        assert (users / str(other.pid)).exists()
    finally:
        other.kill()
        other.wait()


def test_files_of_dead_processes_are_dropped_and_do_not_count(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (users / str(dead.pid)).touch()
    (users / str(os.getpid())).touch()
    (users / "not-a-pid").touch()
    assert _other_live_users(users) is False
    assert not (users / str(dead.pid)).exists()
    assert _other_live_users(tmp_path / "missing") is False


def test_an_unreadable_postmaster_pid_fails_at_once_naming_the_file_and_the_fix(tmp_path):
    """`fleet status` on the embedded servers, with a postmaster.pid that cannot be
    read: exit 3 naming the file and what to do, before any server starts."""
    from click.testing import CliRunner

    from fleet.cli import main

    pidfile = tmp_path / "state" / "postgres" / "postmaster.pid"
    pidfile.mkdir(parents=True)  # not a file: unreadable as one
    res = CliRunner().invoke(
        main,
        ["status"],
        env={"DATABASE_URL": None, "BROKER_URL": None, "FLEET_STATE_DIR": str(tmp_path / "state")},
    )
    assert res.exit_code == 3, res.output
    assert f"cannot read {pidfile}" in res.output and "remove the file" in res.output
    assert not (tmp_path / "state" / "postgres" / "PG_VERSION").exists()
