"""`fleet flower` as a real process on the fleet's broker: basic auth by default,
the password kept out of logs and `ps`, the running worker listed; and the
`fleet_info` inspect command answered by a real worker."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, ServedProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKER = "intent@gpu0.%h"


class FlowerProcess(ServedProcess):
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        port = free_port()
        super().__init__(["flower", "--port", str(port), *args], env, port, log)


def _worker_listed(flower: FlowerProcess, auth: tuple[str, str], name: str) -> bool:
    status, body = flower.get("/api/workers?refresh=1", auth)
    assert status == 200, body[:500]
    return name in json.loads(body)


def fleet_info(env: dict[str, str], name: str) -> dict:
    """The `fleet_info` reply of one worker, through the `celery inspect` client."""
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "fleet.ops.celeryapp", "inspect", "fleet_info"]
        + ["-d", name, "--json", "-t", "10"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])[name]


def test_flower_lists_the_worker_behind_the_password_and_fleet_info_names_its_model(fleet):
    worker = fleet.worker(name=WORKER)
    worker.wait_ready()
    name = WORKER.replace("%h", socket.gethostname())
    flower = FlowerProcess(fleet.env, fleet.tmp / "flower.log")
    try:
        flower.wait_up()
        pw_file = Path(fleet.env["FLEET_STATE_DIR"]) / "flower-password"
        assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
        password = pw_file.read_text().strip()
        assert len(password) >= 24
        auth = ("fleet", password)

        status, body = flower.get("/", auth)
        assert status == 200 and b"Flower" in body
        assert flower.get("/")[0] == 401
        assert flower.get("/", ("fleet", password + "x"))[0] == 401
        assert flower.get("/api/workers", ("someone", password))[0] == 401

        deadline = time.monotonic() + 60
        while not _worker_listed(flower, auth, name):
            assert time.monotonic() < deadline, f"{name} not in Flower's /api/workers"
            time.sleep(1)
        deadline = time.monotonic() + 30
        while name.encode() not in flower.get("/", auth)[1]:  # the dashboard, from events
            assert time.monotonic() < deadline, f"{name} not on Flower's dashboard"
            time.sleep(1)

        cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        log = flower.log.read_text()
        assert password not in log
        assert f"the password is in {pw_file}" in log
        assert f"http://127.0.0.1:{flower.port}/" in log
    finally:
        flower.stop()
    info = fleet_info(fleet.env, name)
    assert info["hostname"] == name and info["role"] == "worker"
    assert info["task"] == "intent" and info["queues"] == ["fleet.intent"]
    assert info["model"] == "tiny-big" and info["tier"] == 0
    assert info["ladder"] == ["tiny-big", "tiny-small"]
    assert info["device"] == "cpu" and info["gpu"] is None
    assert info["budget_tokens"] == 4096
    assert info["memory"]["rss_mb"] > 50
    assert info["pid"] == worker.proc.pid
    # The same password next time: it is kept, not regenerated.
    again = FlowerProcess(fleet.env, fleet.tmp / "flower2.log")
    try:
        again.wait_up()
        assert again.get("/", auth)[0] == 200
    finally:
        again.stop()


def test_flower_password_from_settings_and_the_no_auth_opt_out(fleet):
    env = dict(fleet.env, FLEET_FLOWER_PASSWORD="correct-horse-battery", FLEET_FLOWER_USER="ops")
    flower = FlowerProcess(env, fleet.tmp / "flower.log")
    open_flower = FlowerProcess(fleet.env, fleet.tmp / "open.log", "--no-auth")
    try:
        flower.wait_up()
        assert flower.get("/", ("ops", "correct-horse-battery"))[0] == 200
        assert flower.get("/", ("fleet", "correct-horse-battery"))[0] == 401
        assert "FLEET_FLOWER_PASSWORD" in flower.log.read_text()
        assert "correct-horse-battery" not in flower.log.read_text()
        assert not (Path(fleet.env["FLEET_STATE_DIR"]) / "flower-password").exists()

        open_flower.wait_up()
        assert open_flower.get("/")[0] == 200
        assert "warning: Flower without authentication" in open_flower.log.read_text()
        assert open_flower.get("/api/workers")[0] == 401  # Flower keeps its API closed
    finally:
        flower.stop()
        open_flower.stop()

    bad = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "flower", "--port", str(free_port())],
        env=dict(fleet.env, FLEET_FLOWER_PASSWORD="a,b"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "contain no ','" in bad.stderr
    assert "a,b" not in bad.stderr + bad.stdout

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "flower", "--port", str(port)],
            env=fleet.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 2, busy.stderr
    assert f"Flower cannot listen on 127.0.0.1:{port}: Address already in use" in busy.stderr
