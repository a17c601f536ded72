"""Every name the fleet's processes agree on in Redis: the queues and the
`fleet:*` keys. Written once here, so a reader and a writer cannot drift.

    fleet.<task>              a task's queue (Celery list); KEDA scales on its length
    fleet.control             `fleet beat`'s control worker (scheduled producer tasks)
    fleet.default             Celery's default queue (nothing of ours is sent there)
    fleet:finished            list: task names of finished batches (`fleet run` BLPOPs)
    fleet:worker:<hostname>   JSON worker stats with a TTL (wire.stats)
    fleet:batch:<batch_id>    holder mark of a running batch (workers.heartbeat)
    fleet:resume:<id>:<n>     a batch retried after a transient error (workers.batch)
"""

from __future__ import annotations

QUEUE_PREFIX = "fleet."
DEFAULT_QUEUE = "fleet.default"
CONTROL_QUEUE = "fleet.control"

FINISHED = "fleet:finished"
FINISHED_KEEP = 1000  # the finished list never grows past this, whoever reads it
WORKER_PREFIX = "fleet:worker:"
BATCH_HOLDER_PREFIX = "fleet:batch:"
RESUME_PREFIX = "fleet:resume:"


def task_queue(task: str) -> str:
    """The queue of `task`'s batches: "intent" -> "fleet.intent"."""
    return QUEUE_PREFIX + task


def queue_task(queue: str) -> str | None:
    """The task a queue carries ("fleet.intent" -> "intent"); None for the control
    and default queues and for a queue that is not the fleet's."""
    if queue in (CONTROL_QUEUE, DEFAULT_QUEUE) or not queue.startswith(QUEUE_PREFIX):
        return None
    return queue.removeprefix(QUEUE_PREFIX) or None


def worker(hostname: str) -> str:
    """The key of a worker's published stats (Celery hostname, e.g. intent@gpu0-81.h)."""
    return WORKER_PREFIX + hostname


def batch_holder(batch_id: str) -> str:
    """The key of a running batch's holder mark."""
    return BATCH_HOLDER_PREFIX + batch_id


def resume(batch_id: str, attempt: int) -> str:
    """The key that marks a batch's `attempt` as a resume after a transient error."""
    return f"{RESUME_PREFIX}{batch_id}:{attempt}"
