"""The `fleet` command as a subprocess: its environment and one run of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from tests.support.env import REPO


def fleet_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "DATABASE_URL", "BROKER_URL"))
    }
    env.update(settings_env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_fleet(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fleet {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def sigint_as_at_a_terminal() -> None:
    """preexec_fn for a child that a test stops with SIGINT (a Ctrl-C): restore
    the default disposition. A test run started in the background (`cmd &` in
    a shell without job control) has SIGINT ignored, the child inherits that,
    and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
