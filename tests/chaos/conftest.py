"""Fixtures for the chaos suite: throwaway servers and a small fleet harness.

Tests that kill or restart Postgres or Redis use `servers` (their own
processes on free ports); tests that only kill workers use the shared
services through the `db_url` / `broker_url` fixtures of tests/conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from tests.chaos.servers import PostgresServer, RedisServer, ServerUnavailable
from tests.e2e.conftest import Fleet as E2EFleet
from tests.support import REPO, fleet_env, status_counts, tasks_toml

TINY_LADDER = [
    {"name": "tiny-big", "path": "tiny-big", "max_length": 128, "max_batch_tokens": 4096},
    {"name": "tiny-small", "path": "tiny-small", "max_length": 128, "max_batch_tokens": 4096},
]


@dataclass
class Servers:
    pg: PostgresServer
    redis: RedisServer
    db_url: str
    broker_url: str


def start_servers(*, pg_password: str | None = None, redis_password: str | None = None) -> Servers:
    """A fresh Postgres cluster (migrated `fleet` database) and a Redis, both throwaway."""
    from db.migrate import upgrade

    try:
        pg = PostgresServer(password=pg_password)
        rd = RedisServer(password=redis_password)
    except ServerUnavailable as e:
        pytest.skip(str(e))
    pg.start()
    rd.start()
    url = pg.create_database("fleet")
    upgrade(url)
    return Servers(pg, rd, url, rd.url(0))


def stop_servers(s: Servers) -> None:
    from db.engine import dispose_all

    dispose_all()
    s.redis.destroy()
    s.pg.destroy()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = start_servers()
    try:
        yield s
    finally:
        stop_servers(s)


@dataclass
class Fleet(E2EFleet):
    """Workers and `fleet` commands against one database and broker."""

    name_prefix: ClassVar[str] = "chaos"

    runs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(
        self, task: str = "intent", *, timeout: float = 240, **extra: str
    ) -> subprocess.Popen[str]:
        """`fleet run` as a subprocess; stdout/stderr go to files (read with `run_output`)."""
        n = len(self.runs)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet.cli",
                "run",
                "-t",
                task,
                "--timeout",
                str(timeout),
                "--json",
            ],
            env={**self.env, **extra},
            cwd=REPO,
            stdout=(self.tmp / f"run{n}.out").open("w"),
            stderr=(self.tmp / f"run{n}.err").open("w"),
            text=True,
        )
        self.runs.append(proc)
        return proc

    def run_output(self, proc: subprocess.Popen[str]) -> tuple[str, str]:
        n = self.runs.index(proc)
        return (self.tmp / f"run{n}.out").read_text(), (self.tmp / f"run{n}.err").read_text()

    def wait_run(self, proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            out, err = self.run_output(proc)
            raise AssertionError(
                f"fleet run still going after {timeout}s\n{out}\n{err[-4000:]}"
            ) from None
        out, err = self.run_output(proc)
        return proc.returncode, out, err

    def wait_done(self, task: str, at_least: int, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            counts = status_counts(self.db_url, task)
            if counts.get("done", 0) >= at_least:
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {at_least} done after {timeout}s: {counts}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in self.runs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for w in self.workers:
            w.stop()


def make_fleet(
    db_url: str, broker_url: str, models: Path, tmp: Path, config: Path | None = None, **env: str
) -> Fleet:
    config = config or tasks_toml(tmp / "tasks.toml", TINY_LADDER)
    settings = {
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "FLEET_STATE_DIR": str(tmp / "state"),
        "FLEET_MODELS_DIR": str(models),
        "FLEET_CONFIG_FILE": str(config),
        "FLEET_LEASE_SECONDS": "6",
        "FLEET_RECONCILE_INTERVAL": "1",
        "FLEET_MAX_INFLIGHT_BATCHES": "4",
        "FLEET_BATCH_SIZE": "32",
    }
    settings.update(env)
    return Fleet(db_url, broker_url, tmp, fleet_env(settings))
