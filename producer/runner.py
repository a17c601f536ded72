"""`fleet run` (and `fleet demo`): open a run row and drive its tasks to the
end in this process (producer.drive), closing the row however the run ends."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from celery import Celery

from config.settings import Settings
from config.taskconfig import TaskSpec
from db.engine import transaction
from producer import runs
from producer.drive import drive
from producer.runs import Counts, RunReport


def run_until_done(
    url: str,
    app: Celery,
    specs: Sequence[TaskSpec],
    settings: Settings,
    *,
    trigger: str = "manual",
    timeout: float | None = None,
    poll: float = 0.5,
    progress: Callable[[Counts], None] | None = None,
    gate: Callable[[str], bool] | None = None,
) -> RunReport:
    """Open a runs row (`trigger`), then discover, feed and reconcile until every
    item of `specs` is finished or `timeout` seconds pass (`report.timed_out`).

    `poll`, `progress` and `gate` as in producer.drive.drive. The row closes
    however the run ends; a KeyboardInterrupt or other exception closes it as
    interrupted and is raised again. Errors other than a lost Postgres or Redis
    connection are raised."""
    started = time.monotonic()
    names = [s.name for s in specs]
    with transaction(url) as session:
        run_id = runs.insert(session, trigger=trigger, names=names)
    report = RunReport(run_id)
    with runs.recorded(url, report, names, started=started):
        drive(
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
        )
    return report
