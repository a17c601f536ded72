"""fleet.ops.pool: the one reap rule both supervisors apply to a worker that exits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from config.exitcodes import ExitCode
from fleet.ops.pool import RESTART_CAP_S, STABLE_AFTER_S, WorkerProcess, log_file


def test_exit_2_gives_the_slot_up():
    w = WorkerProcess("intent", 0)
    assert w.after_exit(int(ExitCode.CONFIG), now=100.0, base=1.0) is None
    assert w.restarts == 0


def test_other_exits_back_off_doubling_up_to_the_cap_and_reset_once_stable():
    w = WorkerProcess("intent", None)
    delays = []
    for _ in range(8):
        delays.append(w.after_exit(1, now=w.started + 1.0, base=1.0))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, RESTART_CAP_S, RESTART_CAP_S]
    assert w.next_start == w.started + 1.0 + RESTART_CAP_S
    # Up longer than STABLE_AFTER_S: the next restart waits the base again.
    assert w.after_exit(-9, now=w.started + STABLE_AFTER_S + 1, base=1.0) == 1.0


def test_a_slot_logs_to_task_and_gpu(tmp_path: Path):
    assert log_file(tmp_path, "intent", 3) == tmp_path / "intent-gpu3.log"
    assert log_file(tmp_path, "intent", None) == tmp_path / "intent-cpu.log"


def test_start_and_exited_report_the_code_once(tmp_path: Path):
    w = WorkerProcess("intent", None, tmp_path / "logs" / "intent-cpu.log")
    w.start([sys.executable, "-c", "print('up'); raise SystemExit(3)"], {}, detach=True)
    deadline = time.monotonic() + 30
    code = None
    while code is None and time.monotonic() < deadline:
        code = w.exited()
        time.sleep(0.05)
    w.close_log()
    assert code == 3 and w.exited() is None and not w.alive()
    assert (tmp_path / "logs" / "intent-cpu.log").read_text().strip() == "up"
