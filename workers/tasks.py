"""The thin task layer: decode the message, call the core, handle retries.

No torch import here; the model lives in `workers.state`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from workers.app import TASK_NAME, app
from workers.messages import BatchMessage
from workers.policy import retry_decision

log = logging.getLogger("fleet.worker")

MAX_RETRIES = 8


def is_transient(exc: BaseException) -> bool:
    """Lost database or broker connections: worth retrying the same batch."""
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.DisconnectionError,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError,
            ConnectionError,
        ),
    )


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_batch(self: Task, **kwargs: Any) -> dict[str, Any]:
    from workers.state import process

    msg = BatchMessage.decode(kwargs)
    try:
        return process(msg, hostname=self.request.hostname or "worker")
    except Exception as exc:
        decision = retry_decision(
            transient=is_transient(exc), attempt=msg.attempt, max_retries=MAX_RETRIES
        )
        if not decision.retry:
            # The ledger still holds the items leased; the reconciler returns them.
            log.exception("batch %s failed and is left to the reconciler", msg.batch_id)
            raise
        log.warning(
            "batch %s: transient %s, retry %d in %.1fs",
            msg.batch_id,
            type(exc).__name__,
            msg.attempt + 1,
            decision.countdown,
        )
        raise self.retry(
            kwargs=msg.next_attempt().encode(),
            countdown=decision.countdown,
            max_retries=MAX_RETRIES,
            exc=exc,
        ) from exc
