"""Batch messages sized by cost, not by a fixed count.

A batch message costs a worker a fixed amount outside the model (the Celery
round trip, a few transactions, the log line) plus its items. With a fixed
count that suits a CPU encoder (tens of items a second), a GPU running the
same encoder thousands of times faster spends most of its time on that fixed
part. So `fleet run` aims each message at `FLEET_BATCH_SECONDS` of worker time,
from the throughput the task's workers report (`recent_items_per_s` in their
stats, wire/stats.py):

    size = clamp(rate x batch_seconds,  FLEET_BATCH_SIZE .. FLEET_MAX_BATCH_SIZE,
                 at most rate x lease / 4)

Starting at FLEET_BATCH_SIZE, a fast worker's batches grow within a few
messages to about `batch_seconds` each (the rate measured on small batches
understates the rate at large ones, so sizes climb until the overhead is
amortised). The lease bound keeps a message well inside its lease even before
the heartbeat (workers/heartbeat.py) renews it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def batch_size_for(
    rates: Sequence[float],
    *,
    base: int,
    cap: int,
    target_seconds: float,
    lease_seconds: int,
) -> int:
    """Items per batch message for a task.

    rates: items/s of worker time reported by each live worker of the task
    (<= 0: not measured yet). base: FLEET_BATCH_SIZE, the size without
    measurements and the least size. cap: FLEET_MAX_BATCH_SIZE.
    target_seconds: FLEET_BATCH_SECONDS (0 disables sizing: always `base`).
    """
    measured = [r for r in rates if r > 0]
    if target_seconds <= 0 or not measured:
        return base
    rate = statistics.median(measured)
    size = min(rate * target_seconds, rate * lease_seconds / 4, cap)
    return max(base, min(int(size), cap))
