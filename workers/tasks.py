"""The thin task layer: decode the message, call the core, handle retries.

No torch import here; the model lives in `workers.state`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from workers.app import TASK_NAME, app
from workers.messages import BatchMessage
from workers.policy import retry_decision, transient_service

log = logging.getLogger("fleet.worker")

MAX_RETRIES = 8


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_batch(self: Task, **kwargs: Any) -> dict[str, Any]:
    from workers.state import batch_started, process

    msg = BatchMessage.decode(kwargs)
    try:
        return process(msg, hostname=self.request.hostname or "worker")
    except Exception as exc:
        service = transient_service(exc)
        decision = retry_decision(
            transient=service is not None, attempt=msg.attempt, max_retries=MAX_RETRIES
        )
        if not decision.retry:
            # The ledger still holds the items leased; the reconciler returns them.
            log.exception("batch %s failed and is left to the reconciler", msg.batch_id)
            raise
        log.warning(
            "batch %s: %s unreachable (transient %s), retry %d of %d in %.1fs",
            msg.batch_id,
            service,
            type(exc).__name__,
            msg.attempt + 1,
            MAX_RETRIES,
            decision.countdown,
        )
        raise self.retry(
            # This process lived: its start of the batch, if committed, was no crash;
            # a resume this attempt could not start yet is carried to the next one.
            kwargs=msg.next_attempt(resume=msg.resume or batch_started(msg)).encode(),
            countdown=decision.countdown,
            max_retries=MAX_RETRIES,
            exc=exc,
        ) from exc
