"""Batch messages sized by cost (producer/sizing.py) and the worker's pipeline
chunks (workers/batch.py chunk_plan): pure decisions, table-tested."""

from __future__ import annotations

import pytest

from producer.sizing import batch_size_for


@pytest.mark.parametrize(
    ("rates", "target", "lease", "expected"),
    [
        ([], 1.0, 900, 32),  # nothing measured: the configured size
        ([0.0, 0.0], 1.0, 900, 32),  # workers up, no batch finished yet
        ([80.0], 1.0, 900, 80),  # a CPU encoder: one second of it
        ([10.0], 1.0, 900, 32),  # slower than the floor: never below FLEET_BATCH_SIZE
        ([20_000.0], 1.0, 900, 8192),  # a GPU encoder: capped
        ([3_000.0], 2.0, 900, 6000),
        ([1_000.0, 3_000.0, 2_000.0], 1.0, 900, 2000),  # the median worker
        ([3_000.0], 1.0, 2, 1500),  # at most a quarter of the lease
        ([3_000.0], 0.0, 900, 32),  # sizing off
    ],
)
def test_batch_size_for(rates, target, lease, expected):
    got = batch_size_for(rates, base=32, cap=8192, target_seconds=target, lease_seconds=lease)
    assert got == expected


@pytest.mark.parametrize(
    ("n", "chunk", "expected"),
    [
        (0, 1024, [(0, 0)]),
        (32, 1024, [(0, 32)]),
        (1024, 1024, [(0, 1024)]),
        (1025, 1024, [(0, 513), (513, 1025)]),  # never a one-item tail
        (4096, 1024, [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]),
        (10, 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    ],
)
def test_chunk_plan(n, chunk, expected):
    from workers.batch import chunk_plan

    plan = chunk_plan(n, chunk=chunk)
    assert plan == expected
    assert sum(b - a for a, b in plan) == n
