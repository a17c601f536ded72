"""The thin task layer: decode the message, call the batch core, handle retries.

No torch import here; the model lives in `workers.state`. Nothing is
registered at import: the worker's entry calls `register_tasks(app)`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Retry

from wire.messages import TASK_NAME, BatchMessage
from wire.retry import retry_decision, transient_service

if TYPE_CHECKING:
    from workers.batch import BatchAttempt

log = logging.getLogger("fleet.worker")

MAX_RETRIES = 8


def register_tasks(app: Celery) -> Task:
    """Register the batch task (`TASK_NAME`) on `app`; returns it."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_batch(self: Task, **kwargs: Any) -> dict[str, Any]:
        from workers.batch import BatchAttempt, process
        from workers.state import current

        attempt = BatchAttempt(BatchMessage.decode(kwargs))
        try:
            return process(current(), attempt, hostname=self.request.hostname or "worker").summary()
        except Exception as exc:
            retry = _retry(self, attempt, exc)
            if retry is None:
                raise
            raise retry from exc

    return run_batch


def _retry(task: Task, attempt: BatchAttempt, exc: Exception) -> Retry | None:
    """Celery's Retry (the message sent again, with backoff) for a transient
    service error, up to MAX_RETRIES; None (logged) when the batch is left to
    the reconciler."""
    msg = attempt.msg
    service = transient_service(exc)
    decision = retry_decision(
        transient=service is not None, attempt=msg.attempt, max_retries=MAX_RETRIES
    )
    if not decision.retry:
        # The ledger still holds the items leased; the reconciler returns them.
        log.exception("batch %s failed and is left to the reconciler", msg.batch_id)
        return None
    log.warning(
        "batch %s: %s unreachable (transient %s), retry %d of %d in %.1fs",
        msg.batch_id,
        service,
        type(exc).__name__,
        msg.attempt + 1,
        MAX_RETRIES,
        decision.countdown,
    )
    return task.retry(
        # This process lived: its start of the batch, if committed, was no crash;
        # a resume this attempt could not start yet is carried to the next one.
        kwargs=msg.next_attempt(resume=msg.resume or attempt.started).encode(),
        countdown=decision.countdown,
        max_retries=MAX_RETRIES,
        exc=exc,
        throw=False,
    )
