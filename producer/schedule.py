"""The Celery side of the nightly job: the beat schedule and the control tasks.

`fleet beat` runs one process: a Celery worker consuming only the control
queue (`fleet.control`, no model loaded) with beat embedded (`-B`). Beat sends,
to that queue:

    fleet.nightly         on settings.nightly_crontab, in settings.timezone:
                          open a run, discover every task, send what backpressure allows
    fleet.nightly_tick    every beat_feed_seconds: top up the open run's queues,
                          close it when nothing is pending, queued or running
    fleet.reconcile       every beat_reconcile_seconds: expired leases back to pending
    fleet.sync            every sync_seconds (when set): sync the declared sources
                          (with triggers installed, only those marked changed); rows
                          new, changed or back are discovered and fed at once (a beat
                          run is opened, or the open one's next tick feeds them)

Each task returns in seconds; the core is `producer.beat`. GPU workers
never see these tasks: each consumes only its own `fleet.<task>` queue.
"""

from __future__ import annotations

import zoneinfo
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.schedules import ParseException, crontab

from config.settings import Settings
from config.taskconfig import TaskSpec
from wire.keys import CONTROL_QUEUE

NIGHTLY_TASK = "fleet.nightly"
TICK_TASK = "fleet.nightly_tick"
RECONCILE_TASK = "fleet.reconcile"
SYNC_TASK = "fleet.sync"
# A nightly message older than this is dropped (the control worker was down all night).
NIGHTLY_EXPIRES_S = 6 * 3600


class ScheduleError(ValueError):
    pass


def parse_crontab(expr: str, tz: str) -> crontab:
    """'minute hour day-of-month month day-of-week' -> a Celery crontab; clear errors."""
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"FLEET_TIMEZONE={tz!r} is not a known time zone; use an IANA name such as "
            "'UTC' or 'Europe/Berlin'"
        ) from None
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"FLEET_NIGHTLY_CRONTAB={expr!r} needs 5 fields (minute hour day-of-month month "
            "day-of-week), e.g. '0 2 * * *' for 02:00 every day"
        )
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
        )
    except (ValueError, ParseException) as e:
        raise ScheduleError(f"FLEET_NIGHTLY_CRONTAB={expr!r} is not a valid crontab: {e}") from None


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule built from the settings (Celery's beat_schedule format)."""
    feed_s, reconcile_s = settings.beat_feed_seconds, settings.beat_reconcile_seconds
    sync: dict[str, dict[str, Any]] = {}
    if settings.sync_seconds is not None:
        sync["sync"] = {
            "task": SYNC_TASK,
            "schedule": timedelta(seconds=settings.sync_seconds),
            "options": {"queue": CONTROL_QUEUE, "expires": max(settings.sync_seconds, 1.0)},
        }
    return sync | {
        "nightly": {
            "task": NIGHTLY_TASK,
            "schedule": parse_crontab(settings.nightly_crontab, settings.timezone),
            "options": {"queue": CONTROL_QUEUE, "expires": NIGHTLY_EXPIRES_S},
        },
        "nightly-tick": {
            "task": TICK_TASK,
            "schedule": timedelta(seconds=feed_s),
            # A tick nobody took in time is superseded by the next one.
            "options": {"queue": CONTROL_QUEUE, "expires": max(feed_s, 1.0)},
        },
        "reconcile": {
            "task": RECONCILE_TASK,
            "schedule": timedelta(seconds=reconcile_s),
            "options": {"queue": CONTROL_QUEUE, "expires": max(reconcile_s, 1.0)},
        },
    }


def install(app: Celery, settings: Settings, tasks: dict[str, TaskSpec]) -> Celery:
    """Register the control tasks and the beat schedule on `app`.

    `settings` must have its services resolved (both URLs set)."""
    from producer import beat
    from producer.drive import run_specs
    from producer.reconciler import reconcile
    from producer.runlock import holder_name

    url = settings.db_url()

    def nightly_task(self: Any) -> dict[str, Any]:
        specs = run_specs(tasks, settings.nightly_task_names() or None)
        holder = self.request.hostname or holder_name()
        return beat.start(url, app, specs, settings, holder=holder)

    def tick_task() -> dict[str, Any] | None:
        return beat.tick(url, app, tasks, settings)

    def reconcile_task() -> dict[str, int]:
        return reconcile(url, max_attempts=settings.max_attempts)

    def sync_task(self: Any) -> list[dict[str, Any]]:
        from config.taskconfig import load_sources
        from producer.sync import beat_tick

        reports = beat_tick(settings, load_sources(settings.config_file))
        if any(r.get("new") or r.get("changed") or r.get("returned") for r in reports):
            # Continuous mode: what was synced is classified now, not at the next nightly.
            specs = run_specs(tasks, settings.nightly_task_names() or None)
            holder = self.request.hostname or holder_name()
            beat.start(url, app, specs, settings, holder=holder, sync=False)
        return reports

    # Registered by call rather than as decorators: Celery's are untyped.
    app.task(name=NIGHTLY_TASK, bind=True, ignore_result=True)(nightly_task)
    app.task(name=TICK_TASK, ignore_result=True)(tick_task)
    app.task(name=RECONCILE_TASK, ignore_result=True)(reconcile_task)
    app.task(name=SYNC_TASK, bind=True, ignore_result=True)(sync_task)

    app.conf.timezone = settings.timezone
    app.conf.beat_schedule = beat_schedule(settings)
    return app
