"""`fleet nightly`: one nightly run (trigger 'nightly') driven to its end in
the foreground, for cron or a Kubernetes CronJob.

`drive` opens the run (one at a time: producer.runlock), holds the run's
session lock for as long as this process lives, syncs the declared sources
and takes the run to the end with the drive loop of producer.drive: the same
passes and the same sized Feeder as `fleet run` and beat's tick
(producer.beat). The row itself is written by producer.runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config.settings import Settings
from config.taskconfig import TaskSpec
from producer import runs
from producer.drive import drive as drive_run
from producer.runlock import (
    FOREGROUND,
    RunLock,
    beat_stale_after,
    holder_name,
    open_run,
    run_key,
)
from producer.runs import Counts, RunReport

log = logging.getLogger("fleet.nightly")


def drive(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[Counts], None] | None = None,
    holder: str | None = None,
    gate: Callable[[str], bool] | None = None,
) -> RunReport:
    """Open a nightly run and drive it to the end in this process
    (producer.drive.drive, after syncing the declared sources).

    `poll`, `progress` and `gate` as in producer.drive.drive; `holder` defaults
    to holder_name(). The row closes however the run ends (interrupted on an
    exception, which is raised again), unless another driver took the run over
    during an outage. Raises RunStillGoing when another nightly run is alive."""
    started = time.monotonic()
    names = [s.name for s in specs]
    # A dedicated connection holds the run's session lock while this process drives it.
    lock = RunLock(url)
    try:
        with Session(bind=lock.connect()) as session, session.begin():
            run_id, took_over = open_run(
                session,
                names,
                mode=FOREGROUND,
                holder=holder or holder_name(),
                stale_after=beat_stale_after(settings),
            )
            session.execute(select(func.pg_advisory_lock(run_key(run_id))))
        lock.run_id = run_id
        report = RunReport(run_id, took_over=took_over)
        log.info("nightly run %d opened over %s", run_id, ", ".join(names))
        with runs.recorded(url, report, names, started=started):
            drive_run(
                url,
                app,
                specs,
                settings,
                report,
                started=started,
                timeout=timeout,
                poll=poll,
                progress=progress,
                gate=gate,
                sync=True,
                held=lock.retake,
            )
        lock.release()
    finally:
        lock.close()
    return report
