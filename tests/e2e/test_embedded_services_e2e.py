"""The embedded default under concurrency: processes that start at the same
moment on one state folder share one Postgres and one Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

pytestmark = pytest.mark.e2e

# Starts (or attaches to) the embedded servers, says which it got, then holds
# them until the test lets go: all four processes are alive at the same time.
HOLDER = """
import json, sys, time
from pathlib import Path
from config.settings import Settings
from fleet.ops.services import ensure_services
s = ensure_services(Settings())
print(json.dumps({"db": s.db_url(), "broker": s.redis_url()}), flush=True)
release = Path(sys.argv[1])
while not release.exists():
    time.sleep(0.1)
"""


def _embedded_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["FLEET_STATE_DIR"] = str(state)
    return env


def _redis_servers_in(folder: Path) -> int:
    """redis-server processes working in this folder (Redis chdirs to its `dir`)."""
    import psutil

    n = 0
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "redis-server" and Path(p.cwd()) == folder.resolve():
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return n


def test_four_processes_at_once_share_one_postgres_and_one_redis(tmp_path):
    state = tmp_path / "state"
    release = tmp_path / "release"
    env = _embedded_env(state)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(release)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        got = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line, (
                f"holder exited: {p.wait(timeout=10)} {p.stderr.read() if p.stderr else ''}"
            )
            got.append(json.loads(line))
        assert len({g["broker"] for g in got}) == 1, got
        assert len({g["db"] for g in got}) == 1, got
        socket_file = got[0]["broker"].removeprefix("redis+socket://")
        client = redis.Redis(unix_socket_path=socket_file)
        client.set("fleet:probe", "one server")
        assert client.get("fleet:probe") == b"one server"
        # Every holder is a client of that one server (its own pool's connection).
        assert len(client.client_list()) >= 5
        client.close()
        assert _redis_servers_in(state / "redis") == 1
        registry = json.loads((state / "redis" / "fleet.rdb.settings").read_text())
        assert registry["unixsocket"] == socket_file
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [
        p.stderr.read() if p.stderr else "" for p in procs
    ]
    # The last one out stopped the server it shared.
    deadline = time.monotonic() + 10
    while Path(socket_file).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(socket_file).exists()
    # Nothing is left that the next start would have to look into.
    assert not (state / "redis" / "fleet.rdb.settings").exists()


def test_a_dead_servers_record_is_not_reused(tmp_path):
    """A registry naming a server that no longer answers (killed, socket gone)
    is dropped and a fresh server starts."""
    state = tmp_path / "state"
    (state / "redis").mkdir(parents=True)
    (state / "redis" / "fleet.rdb.settings").write_text(
        json.dumps(
            {
                "pidfile": str(tmp_path / "gone.pid"),
                "unixsocket": str(tmp_path / "gone.socket"),
            }
        )
    )
    (tmp_path / "gone.pid").write_text(str(os.getpid()))  # a live pid that is no Redis
    (tmp_path / "gone.socket").write_text("")  # a path that is there but answers nothing
    release = tmp_path / "release"
    release.touch()
    out = subprocess.run(
        [sys.executable, "-c", HOLDER, str(release)],
        env=_embedded_env(state),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    broker = json.loads(out.stdout)["broker"]
    assert "gone.socket" not in broker
    assert "does not answer" in out.stderr


def _holder(env: dict[str, str], release: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(release)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


def _stop_postgres(pgdata: Path) -> None:
    """Leave no server behind, whatever the test's outcome."""
    import psutil

    pid = _postmaster_pid(pgdata)
    if pid is None:
        return
    try:
        proc = psutil.Process(pid)
        if proc.name() == "postgres":
            proc.terminate()
            proc.wait(20)
    except psutil.Error:
        pass


def test_a_stale_postmaster_pid_naming_a_live_process_is_replaced(tmp_path):
    """After a crash postmaster.pid stays; its PID now belongs to another live
    process. The next command starts the server instead of failing to connect."""
    state = tmp_path / "state"
    pgdata = state / "postgres"
    release = tmp_path / "release"
    release.touch()
    env = _embedded_env(state)
    first = subprocess.run(
        [sys.executable, "-c", HOLDER, str(release)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert first.returncode == 0, first.stderr
    assert _postmaster_pid(pgdata) is None  # the last one out stopped it
    other = subprocess.Popen(["sleep", "300"])  # a live process that is no postgres
    try:
        (pgdata / "postmaster.pid").write_text(
            f"{other.pid}\n{pgdata}\n{int(time.time())}\n5432\n{pgdata}\n\n"
            "  5432001         0\nready   \n"
        )
        again = subprocess.run(
            [sys.executable, "-c", HOLDER, str(release)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert again.returncode == 0, again.stderr
        assert "postmaster.pid names PID" in again.stderr, again.stderr
        assert json.loads(again.stdout)["db"]
        assert other.poll() is None  # the process the file named was left alone
    finally:
        other.kill()
        other.wait()
        _stop_postgres(pgdata)


def test_a_killed_process_does_not_keep_postgres_running(tmp_path):
    """A fleet process killed without its exit hooks stays in the embedded
    server's handle list; the last live process to exit still stops the server."""
    import psutil

    state = tmp_path / "state"
    pgdata = state / "postgres"
    env = _embedded_env(state)
    killed = _holder(env, tmp_path / "never")
    survivor = _holder(env, tmp_path / "release")
    try:
        for p in (killed, survivor):
            assert p.stdout is not None
            assert p.stdout.readline(), p.stderr.read() if p.stderr else ""
        pid = _postmaster_pid(pgdata)
        assert pid is not None
        handles = json.loads((pgdata / ".handle_pids.json").read_text())
        assert killed.pid in handles and survivor.pid in handles
        killed.kill()
        killed.wait()
        (tmp_path / "release").touch()
        assert survivor.wait(timeout=60) == 0
        deadline = time.monotonic() + 20
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.pid_exists(pid), "postgres still runs after the last process left"
        assert _postmaster_pid(pgdata) is None
    finally:
        for p in (killed, survivor):
            if p.poll() is None:
                p.kill()
                p.wait()
        _stop_postgres(pgdata)
