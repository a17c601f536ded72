"""The Celery app and its configuration. Imports nothing heavy, so the
producer and Flower can build an app cheaply (`create_app(settings)`).

Importing this module builds nothing, starts nothing and connects no signal:
the worker process's entry (`celery -A fleet.ops.celeryapp worker`) builds its
app with `create_app`, registers the task (workers.tasks) and connects the
worker signals.

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

from celery import Celery

from config.settings import Settings
from wire import (
    control,  # noqa: F401  # registers the fleet_info inspect command
    keys,
)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for `settings` (broker URL from `settings.redis_url()`)."""
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
        "task_default_queue": keys.DEFAULT_QUEUE,
        "task_create_missing_queues": True,
    }


def create_app(settings: Settings) -> Celery:
    """A new Celery app for `settings` (not set as current; no task registered).

    `settings` must have its broker URL set (fleet.ops.services.ensure_services
    sets it on the embedded default); the app keeps them as `app.fleet_settings`.
    Raises RuntimeError when the broker URL is unset.
    """
    app = Celery("fleet", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Not in conf: `inspect conf` would show the secrets.
    app.fleet_settings = settings
    return app
