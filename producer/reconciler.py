"""The reconciler: the ledger, not the broker, decides what is unfinished.

Expired leases (a worker killed mid-batch, a message lost with Redis) go back
to pending; items that used up their attempts go to dead with the reason.
"""

from __future__ import annotations

import logging

from db import ledger
from db.engine import transaction

log = logging.getLogger("fleet.reconciler")


def reconcile(url: str, *, max_attempts: int, task: str | None = None) -> dict[str, int]:
    with transaction(url) as session:
        counts = ledger.reconcile(session, max_attempts=max_attempts, task=task)
    if counts["returned"] or counts["dead"]:
        log.warning(
            "reconciler: %d expired leases back to pending, %d dead",
            counts["returned"],
            counts["dead"],
        )
    return counts
