"""Claim the backlog and send it to the queues, ids only.

Order matters: items are claimed (committed as queued, with a lease) before
their batch is sent. If sending fails, nothing is lost: the lease expires and
the reconciler returns the items to pending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery

from config.taskconfig import TaskSpec
from db import ledger
from db.engine import transaction
from wire.messages import BatchMessage, send_batches

CLAIM_CHUNK = 20_000  # items per claim transaction: bounded memory for any backlog
# An enqueue that claims at least this many items refreshes the planner's
# statistics of the ledger afterwards (see ledger.analyze).
ANALYZE_AFTER = 50_000


@dataclass(frozen=True)
class EnqueueReport:
    task: str
    discovered: int
    items: int
    batches: int
    dry_run: bool = False


def discover(url: str, spec: TaskSpec) -> int:
    with transaction(url) as session:
        return ledger.discover(session, task=spec.name, source_kind=spec.source)


def queue_depth(app: Celery, queue: str, *, client: redis.Redis | None = None) -> int:
    """Messages waiting in a queue (Redis list length), asked with `client`
    (a Redis client of the broker) or else over a new broker connection. The
    drive loop asks on every feed pass, with its own client (producer.drive.Feeder)."""
    if client is not None:
        return int(client.llen(queue))
    with app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(queue))


def enqueue(
    url: str,
    app: Celery,
    spec: TaskSpec,
    *,
    limit: int | None,
    batch_size: int,
    lease_seconds: int,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EnqueueReport:
    discovered = 0 if dry_run else discover(url, spec)
    if dry_run:
        with transaction(url) as session:
            pending, undiscovered = ledger.claimable(
                session, task=spec.name, source_kind=spec.source
            )
        n = pending + undiscovered
        if limit is not None:
            n = min(n, limit)
        return EnqueueReport(spec.name, undiscovered, n, -(-n // batch_size), dry_run=True)
    sent_items = sent_batches = 0
    while limit is None or sent_items < limit:
        want = CLAIM_CHUNK if limit is None else min(CLAIM_CHUNK, limit - sent_items)
        # Whole batches per chunk, so a chunk boundary never makes a short batch.
        want = max(batch_size, want - want % batch_size) if want >= batch_size else want
        batches = claim_and_send(
            url,
            app,
            spec,
            limit=want,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            progress=progress,
        )
        if not batches:
            break
        sent_items += sum(len(b.item_ids) for b in batches)
        sent_batches += len(batches)
    if sent_items >= ANALYZE_AFTER:
        with transaction(url) as session:
            ledger.analyze(session)
    return EnqueueReport(spec.name, discovered, sent_items, sent_batches)


def claim_and_send(
    url: str,
    app: Celery,
    spec: TaskSpec,
    *,
    limit: int,
    batch_size: int,
    lease_seconds: int,
    progress: Callable[[int], None] | None = None,
) -> list[ledger.ClaimedBatch]:
    """Claim up to `limit` items (committed as queued first) and send their batches
    over one pooled broker connection, pipelined."""
    with transaction(url) as session:
        batches = ledger.claim_batches(
            session,
            task=spec.name,
            limit=limit,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
        )
    if batches:
        send_batches(
            app,
            (BatchMessage(spec.name, b.batch_id, b.item_ids) for b in batches),
            progress=progress,
        )
    return batches
