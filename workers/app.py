"""The Celery app and its configuration. Imports nothing heavy, so the
producer and Flower can load it cheaply (`celery -A workers.app flower`).

The settings here are what make the queue safe:
- JSON only (no pickle: a pickled message is rejected and logged);
- acks_late + reject_on_worker_lost: a batch is acknowledged only after its
  results are committed, so a killed worker's batch is delivered again;
- prefetch 1: a worker holds one batch at a time, nothing waits behind a crash;
- no result backend: Postgres is the result store;
- visibility_timeout longer than the longest batch, or Redis redelivers a
  batch that is still running (harmless - the ledger skips it - but wasteful).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from fleet.config.settings import Settings
from workers.control import CONTROL_QUEUE  # also registers the fleet_info inspect command

TASK_NAME = "fleet.run_batch"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url(),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for unacknowledged messages past the visibility timeout every
            # few seconds (kombu's default is about every 100 s), so a dead
            # worker's batch comes back soon after the timeout; a live long batch
            # redelivered this way is recognised by its heartbeat (workers.heartbeat).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": True,  # Flower
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_default_queue": "fleet.default",
        "task_create_missing_queues": True,
    }


def create_app(settings: Settings) -> Celery:
    app = Celery("fleet", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.fleet_settings = settings  # type: ignore[attr-defined]  # not in conf: `inspect conf` would show secrets
    return app


def _process_settings() -> Settings:
    settings = Settings()
    if settings.embedded:
        # `celery -A workers.app worker` with no URLs: the same embedded servers
        # as the `fleet` command uses.
        from fleet.ops.services import ensure_services

        settings = ensure_services(settings)
    return settings


app = create_app(_process_settings())
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)


@signals.worker_init.connect
def _load_model_at_start(sender: Any = None, **_: Any) -> None:
    """Load the task's model once, before the worker takes its first batch.

    The task is named by the worker's queue (`-Q fleet.<task>`), so
    `celery -A workers.app worker -Q fleet.intent` works as `fleet worker` does.
    """
    queues = list(sender.app.amqp.queues.consume_from or {})
    if queues == [CONTROL_QUEUE]:
        return  # `fleet beat`'s control worker: scheduled producer tasks, no model
    from workers.state import start_runtime

    tasks = [
        q.removeprefix("fleet.") for q in queues if q.startswith("fleet.") and q != "fleet.default"
    ]
    if len(tasks) != 1:
        raise SystemExit(
            f"a fleet worker serves exactly one task queue, got {queues or 'none'}: "
            "start it with `fleet worker --task T` or `celery -A workers.app worker -Q fleet.T`"
        )
    from workers.device import set_threads

    set_threads(sender.app.fleet_settings.torch_threads)
    _follow_parent(sender.app.fleet_settings.parent_pid)
    try:
        start_runtime(sender.app.fleet_settings, tasks[0], hostname=sender.hostname, app=sender.app)
    except Exception as exc:
        _exit_before_consuming(tasks[0], exc)


def _follow_parent(pid: int | None) -> None:
    """A local worker (fleet.ops.localworkers) stops with the `fleet` process that
    started it: once that is gone (even SIGKILLed, so it could not stop its
    workers), the worker sends itself SIGTERM, Celery's warm shutdown."""
    if pid is None:
        return
    import logging
    import os
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        logging.getLogger("fleet.worker").warning(
            "the fleet process %d that started this worker is gone; stopping (warm shutdown)", pid
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fleet-parent", daemon=True).start()


# A worker that cannot load its model exits before it consumes a message, with
# EXIT_CONFIG when a restart cannot help (a missing model, a bad task config):
# `fleet workers` does not restart it, and a deployment sees a failed start, not
# a worker that takes batches and fails each one. Anything else exits 1 and is
# restarted with backoff.
EXIT_CONFIG = 2


def _exit_before_consuming(task: str, exc: Exception) -> None:
    import logging
    import os

    from workers.runtime import ModelMissing

    config = isinstance(exc, (ModelMissing, FileNotFoundError, ValueError, LookupError))
    log = logging.getLogger("fleet.worker")
    log.error(
        "worker for task %r cannot start, so it takes no batches (exit %d): %s",
        task,
        EXIT_CONFIG if config else 1,
        exc,
        exc_info=not config,
    )
    logging.shutdown()
    os._exit(EXIT_CONFIG if config else 1)


@signals.worker_shutdown.connect
def _unload(**_: Any) -> None:
    from workers.state import stop_runtime

    stop_runtime()
