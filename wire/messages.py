"""The one message the fleet sends: small, JSON, ids only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from wire import keys

# The batch task's name: workers register it under this name (workers.tasks), the
# producer sends to it by name, without importing any worker code.
TASK_NAME = "fleet.run_batch"
# Redis commands per pipelined round trip when sending many batches: each batch
# is one LPUSH plus one PUBLISH of its task-sent event (Flower).
PIPELINE_COMMANDS = 1000


@dataclass(frozen=True)
class BatchMessage:
    task: str
    batch_id: str
    item_ids: tuple[int, ...]
    attempt: int = 0
    # Set on a retry after a transient error (Postgres/Redis unreachable) in a
    # worker that had already started the batch and lived: that start was not
    # a crash, so it must not count toward poison isolation.
    resume: bool = False

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "batch_id": self.batch_id,
            "item_ids": list(self.item_ids),
            "attempt": self.attempt,
        }
        if self.resume:
            out["resume"] = True
        return out

    def summary(self) -> str:
        """What logs and Flower show for the message's arguments. Celery would
        otherwise build a truncated repr of every id, which costs more than
        the rest of sending."""
        ids = self.item_ids
        shown = f"[{ids[0]}, ..., {ids[-1]}]" if len(ids) > 2 else repr(list(ids))
        count = f"{len(ids)} item" + ("" if len(ids) == 1 else "s")
        resume = ", 'resume': True" if self.resume else ""
        return (
            f"{{'task': {self.task!r}, 'batch_id': {self.batch_id!r}, "
            f"'item_ids': {shown} ({count}), 'attempt': {self.attempt}{resume}}}"
        )

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> BatchMessage:
        try:
            task, batch_id, ids = raw["task"], raw["batch_id"], raw["item_ids"]
        except KeyError as e:
            raise ValueError(f"batch message lacks {e.args[0]!r}: {sorted(raw)}") from None
        if not isinstance(task, str) or not isinstance(batch_id, str):
            raise ValueError("batch message task and batch_id must be strings")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError("batch message item_ids must be a list of integers")
        return cls(
            task, batch_id, tuple(ids), int(raw.get("attempt", 0)), raw.get("resume") is True
        )

    def next_attempt(self, *, resume: bool = False) -> BatchMessage:
        return replace(self, attempt=self.attempt + 1, resume=resume)


def send_batch(app: Any, msg: BatchMessage, *, producer: Any = None) -> None:
    """Send one batch to its task's queue, by task name (no worker code imported).

    Pass a pooled `producer` when sending many, to reuse one connection."""
    app.send_task(
        TASK_NAME,
        kwargs=msg.encode(),
        queue=keys.task_queue(msg.task),
        producer=producer,
        argsrepr="()",
        kwargsrepr=msg.summary(),
    )


def send_batches(
    app: Any, msgs: Iterable[BatchMessage], *, progress: Callable[[int], None] | None = None
) -> int:
    """Send many batches over one pooled connection, pipelined: kombu's publish
    batch (5.7+) buffers the Redis commands and runs them in one round trip per
    PIPELINE_COMMANDS, instead of one (two, with task-sent events) per message.

    A failure may leave some of them unsent; their items are already committed as
    queued with a lease, so the reconciler returns them to pending when it expires.
    Returns the number of messages sent.
    """
    sent = 0
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)  # kombu < 5.7: one round trip each
        with batch(max_size=PIPELINE_COMMANDS) if batch is not None else nullcontext():
            for msg in msgs:
                send_batch(app, msg, producer=producer)
                sent += 1
                if progress:
                    progress(len(msg.item_ids))
    return sent


# -- the finished-batch signal --------------------------------------------------
# A worker that finishes a batch pushes the task's name here; `fleet run` blocks
# on it (BLPOP) between feed passes, so a queue is refilled the moment a batch
# finishes instead of on the next poll tick. A lost signal costs only a wait of
# at most one poll interval.


def signal_finished(client: Any, task: str) -> None:
    """Tell a waiting driver that a batch of `task` finished (one round trip).

    Raises the client's errors (redis.RedisError); callers treat them as harmless.
    """
    pipe = client.pipeline(transaction=False)
    pipe.lpush(keys.FINISHED, task)
    pipe.ltrim(keys.FINISHED, 0, keys.FINISHED_KEEP - 1)
    pipe.execute()


def wait_finished(client: Any, timeout: float) -> list[str]:
    """Block up to `timeout` seconds for finished-batch signals; return the task
    names signalled (all of them that are waiting, so a burst wakes the driver once).

    Raises the client's errors (redis.RedisError)."""
    got = client.blpop([keys.FINISHED], timeout=max(timeout, 0.01))
    if got is None:
        return []
    names = [got[1].decode() if isinstance(got[1], bytes) else str(got[1])]
    pipe = client.pipeline(transaction=True)
    pipe.lrange(keys.FINISHED, 0, -1)
    pipe.delete(keys.FINISHED)
    rest, _ = pipe.execute()
    names += [r.decode() if isinstance(r, bytes) else str(r) for r in rest]
    return names
