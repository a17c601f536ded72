"""Feeding a fast worker: a batch larger than a pipeline chunk runs as a
pipeline (read, model, write overlapped) and loses nothing; batch sizes grow
from the measured throughput. Real worker, real Postgres and Redis."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.support import conversations, result_count_per_item, run_fleet, write_jsonl

pytestmark = pytest.mark.e2e


def _fake_env(fleet, **settings: str) -> dict[str, str]:
    config = fleet.tmp / "fake.toml"
    config.write_text(
        'include_bundled = false\n[tasks.intent]\nkind = "fake"\nsource = "conversation"\n'
        '[[tasks.intent.ladder]]\nname = "fake"\npath = "tiny-big"\n'
        "max_length = 128\nmax_batch_tokens = 1000000\n"
    )
    return {**fleet.env, "FLEET_CONFIG_FILE": str(config), **settings}


def _batch_lines(logs: str) -> list[dict[str, object]]:
    return [json.loads(m) for m in re.findall(r"batch (\{\"event\": \"batch\".*\})", logs)]


def test_a_batch_larger_than_a_chunk_runs_as_a_pipeline_and_loses_nothing(fleet):
    n = 2500  # three pipeline chunks
    rows = conversations(n)
    for k in (5, 1300, 2499):  # malformed items in the first, middle and last chunk
        rows[k]["messages"] = [{"role": "user", "content": "\u200b"}]
    path = write_jsonl(fleet.tmp / "c.jsonl", rows)
    env = _fake_env(fleet, FLEET_BATCH_SIZE=str(n), FLEET_BATCH_SECONDS="0")
    run_fleet(["ingest", "conversations", str(path)], env)
    w = fleet.worker(**{k: v for k, v in env.items() if k.startswith("FLEET_")})
    w.wait_ready()
    out = run_fleet(["run", "--task", "intent", "--timeout", "240"], env, check=False)
    assert out.returncode == 1, out.stderr  # three items failed, the rest done
    with transaction(fleet.db_url) as s:
        by_status = dict(
            s.execute(text("SELECT status, count(*) FROM work_items GROUP BY 1")).all()
        )
        errors = s.execute(
            text("SELECT last_error FROM work_items WHERE status = 'failed'")
        ).scalars()
        assert all("only empty messages" in e for e in errors)
    assert by_status == {"done": n - 3, "failed": 3}
    per_item = result_count_per_item(fleet.db_url, "intent")
    assert sorted(per_item.values()) == [0] * 3 + [1] * (n - 3)  # one result per done item
    lines = _batch_lines(w.log.read_text())
    assert [(b["items"], b["done"], b["failed"]) for b in lines] == [(n, n - 3, 3)]


def test_batch_sizes_grow_with_the_measured_throughput(fleet):
    n = 6000
    path = write_jsonl(fleet.tmp / "c.jsonl", conversations(n))
    env = _fake_env(
        fleet, FLEET_BATCH_SIZE="16", FLEET_BATCH_SECONDS="0.5", FLEET_MAX_BATCH_SIZE="4000"
    )
    run_fleet(["ingest", "conversations", str(path)], env)
    w = fleet.worker(**{k: v for k, v in env.items() if k.startswith("FLEET_")})
    w.wait_ready()
    run_fleet(["run", "--task", "intent", "--timeout", "240"], env)
    per_item = result_count_per_item(fleet.db_url, "intent")
    assert len(per_item) == n and set(per_item.values()) == {1}
    sizes = [int(b["items"]) for b in _batch_lines(w.log.read_text())]  # type: ignore[call-overload]
    assert sum(sizes) == n
    assert sizes[0] == 16  # nothing measured yet: the configured size
    assert max(sizes) > 16 * 8  # then sized from throughput
    assert len(sizes) < n / 16 / 4  # far fewer messages than fixed-size batches
