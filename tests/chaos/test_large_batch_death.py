"""A worker that dies inside a large batch makes suspects only of the chunks
it had taken up, not of the whole batch.

A batch of several pipeline chunks (workers.batch.PIPELINE_CHUNK) starts each
chunk (running, one delivery counted) as the worker's reader takes it up. One
poison item in the first chunk of a 3,000-item batch kills the worker; on
redelivery the suspects (each then run alone) are the first chunk and at most
the one read ahead, and everything else is no suspect. Nothing is lost or
written twice.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.conftest import make_fleet
from tests.support import (
    REPO,
    conversations,
    result_count_per_item,
    run_fleet,
    status_counts,
    write_jsonl,
)
from workers.batch import PIPELINE_CHUNK, chunk_plan

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

N = 3000
POISON = "c000005"


def _fake_config(tmp: Path) -> Path:
    model = tmp / "fake-model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the fake model loads nothing
    path = tmp / "tasks.toml"
    path.write_text(
        "include_bundled = false\n"
        "[tasks.intent]\n"
        'kind = "fake"\n'
        'source = "conversation"\n'
        "[[tasks.intent.ladder]]\n"
        'name = "fake"\n'
        f'path = "{model}"\n'
        "max_length = 128\n"
        "max_batch_tokens = 1000000\n"
    )
    return path


def test_a_death_in_a_large_batch_suspects_only_the_chunks_taken_up(
    db_url, broker_url, tiny_models, tmp_path
):
    first_chunk = chunk_plan(N)[0][1]
    assert N > 2 * PIPELINE_CHUNK and first_chunk < N // 2  # three chunks or more
    fleet = make_fleet(
        db_url,
        broker_url,
        tiny_models,
        tmp_path,
        config=_fake_config(tmp_path),
        FLEET_CRASH_ON=POISON,
        FLEET_BATCH_SECONDS="0",  # one fixed-size batch of all N items
        FLEET_BATCH_SIZE=str(N),
        FLEET_MAX_INFLIGHT_BATCHES="64",
        FLEET_POISON_CRASHES="1",  # the poison item alone dies once more, then is dead
        FLEET_RESTART_BACKOFF="0.2",
    )
    path = write_jsonl(tmp_path / "c.jsonl", conversations(N))
    run_fleet(["ingest", "conversations", str(path)], fleet.env)
    logs = tmp_path / "logs"
    sup_log = tmp_path / "supervisor.out"
    sup = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "workers",
            "-t",
            "intent",
            "--gpus",
            "0",
            "--log-dir",
            str(logs),
        ],
        env=fleet.env,
        cwd=REPO,
        stdout=sup_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        run = fleet.run(timeout=400)
        code, out, err = fleet.wait_run(run, timeout=420)
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=120)
        fleet.close()
    worker_logs = "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*")))
    assert code == 1, f"expected exit 1 (one item dead)\n{out}\n{err[-3000:]}"
    assert status_counts(db_url, "intent") == {"done": N - 1, "dead": 1}
    per_item = result_count_per_item(db_url, "intent")
    assert sum(per_item.values()) == N - 1 and max(per_item.values()) == 1
    splits = re.findall(r"split, (\d+) suspect\(s\) now run alone, (\d+) other", worker_logs)
    assert splits, worker_logs[-4000:]
    suspects, together = map(int, splits[0])
    # Later splits are of suspects only: with the chaos tier's short lease, singles
    # still queued when their lease ends are reclaimed together and isolated again.
    assert all(int(t) == 0 for _, t in splits[1:]), splits
    # The first chunk, and at most the one the reader had taken up ahead of it.
    assert first_chunk <= suspects <= 2 * first_chunk < N, (suspects, first_chunk)
    # The chunks never taken up stayed queued under the dead batch: they run
    # together in the split when the message comes back before their lease
    # ends (6 s here), or else the reconciler returns them and a new claim
    # takes them, uncounted. Either way they are no suspects.
    assert together in (0, N - suspects), (suspects, together)
    print(f"\n[chaos] a death in a {N}-item batch: {suspects} suspects (whole batch before: {N})")
