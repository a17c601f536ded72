"""The `celery worker` process entry: `celery -A fleet.ops.celeryapp worker -Q fleet.intent`.

Importing this module is starting a worker process: it reads Settings, attaches
the embedded Postgres and Redis when DATABASE_URL / BROKER_URL are unset (the
same servers the `fleet` command uses, migrated), builds the app
(wire.app.create_app), registers the batch task and connects the worker
signals: the task's model loads at worker_init, before the first message is
taken (workers.lifecycle), and unloads at shutdown. `celery -A
fleet.ops.celeryapp inspect fleet_info` uses the same app.

The producer, Flower and `fleet beat` build their own app with
`wire.app.create_app(settings)` and import nothing from here.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from config.settings import Settings
from fleet.ops.services import ensure_services
from wire.app import create_app
from workers.lifecycle import start_worker, stop_worker
from workers.tasks import register_tasks


def process_settings() -> Settings:
    """Settings from the environment, with embedded services attached (and
    started, migrated) for the URLs that are unset."""
    settings = Settings()
    return ensure_services(settings) if settings.embedded else settings


app = create_app(process_settings())
register_tasks(app)


@signals.worker_init.connect
def _load_model_at_start(sender: Any = None, **_: Any) -> None:
    """The task is named by the worker's queue (`-Q fleet.<task>`), so
    `celery -A fleet.ops.celeryapp worker -Q fleet.intent` works as `fleet worker` does."""
    if sender is None or sender.app is not app:
        return
    start_worker(app, sender.app.amqp.queues.consume_from or {}, hostname=sender.hostname)


@signals.worker_shutdown.connect
def _unload(**_: Any) -> None:
    stop_worker()
