"""Long-running real processes: a `celery worker` (via `fleet worker`), a
`fleet` command that serves HTTP (flower, metrics), and a free port for one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support.env import REPO


class WorkerProcess:
    """A real `celery worker` (via `fleet worker`) as a subprocess."""

    def __init__(
        self,
        task: str,
        env: dict[str, str],
        log: Path,
        *,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.task, self.env, self.log = task, dict(env), log
        if extra_env:
            self.env.update(extra_env)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        from fleet.ops.workercommand import worker_argv

        argv = worker_argv(self.task, gpu=None, loglevel="INFO", hostname=self.name)
        env = dict(self.env)
        env["CUDA_VISIBLE_DEVICES"] = ""
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedProcess:
    """A `fleet` command that serves HTTP (flower, metrics) as a real process."""

    def __init__(self, args: Sequence[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", *args],
            env=env,
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited:\n{self.log.read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"not listening after {timeout}s:\n{self.log.read_text()}")

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        import base64

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
