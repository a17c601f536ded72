"""`fleet nightly` and `fleet beat`: the nightly job, once or on a schedule.

`fleet nightly` drives one nightly run in the foreground (cron, a Kubernetes
CronJob). `fleet beat` runs one process: a Celery worker on the control queue
(no model) with beat embedded, which sends the nightly, feed-tick and
reconcile tasks of `producer.schedule` to it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from fleet.cli import Ctx


def _term_as_exit(signum: int, _frame: Any) -> None:
    # SIGTERM (systemd, Kubernetes) unwinds like Ctrl-C, so the run row is closed.
    raise SystemExit(128 + signum)


def nightly_command(
    ctx: Ctx,
    task_names: Sequence[str],
    *,
    timeout: float | None,
    as_json: bool,
    local_workers: bool | None = None,
) -> None:
    from fleet.cli import EXIT_CONFIG, _finish_run, fail
    from fleet.observe.display import run_progress
    from fleet.ops.localworkers import LocalWorkersFailed, maybe_local_workers, wanted
    from producer.nightly import RunStillGoing, drive, run_specs

    local = wanted(local_workers, ctx.settings)  # before services() fills in the URLs
    task_names = list(task_names) or ctx.settings.nightly_task_names()
    for name in task_names:
        ctx.task(name)  # a typo (also in FLEET_NIGHTLY_TASKS) fails here, with the list of tasks
    specs = run_specs(ctx.tasks(), task_names or None)
    s = ctx.services()
    app = ctx.app()
    signal.signal(signal.SIGTERM, _term_as_exit)
    try:
        # Workers start on the loop's first pass, once this process drives the run.
        with (
            maybe_local_workers(specs, s, enabled=local) as lw,
            run_progress(
                [sp.name for sp in specs], quiet=as_json, workers=lw.notes if lw else None
            ) as update,
        ):
            report = drive(
                s.db_url(),
                app,
                specs,
                s,
                timeout=timeout,
                progress=lw.wrap(update) if lw else update,
                gate=lw.gate if lw else None,
            )
    except LocalWorkersFailed as e:
        fail(str(e), EXIT_CONFIG)
    except RunStillGoing as e:
        if as_json:
            click.echo(json.dumps({"run_id": None, "still_going": e.run.run_id, "message": str(e)}))
        else:
            click.echo(
                f"{e}. It closes when its items finish; `fleet backlog` shows them.", err=True
            )
        return
    if report.took_over and not as_json:
        click.echo(
            f"closed abandoned nightly run(s) {report.took_over} (their driver was gone)", err=True
        )
    _finish_run(report, as_json)


def beat_command(ctx: Ctx, *, loglevel: str) -> int:
    from db.engine import dispose_all
    from fleet.cli import EXIT_CONFIG, fail
    from fleet.config.logs import setup_logging
    from producer.schedule import ScheduleError, beat_schedule, install
    from workers.control import CONTROL_QUEUE

    try:
        beat_schedule(ctx.settings)  # a bad crontab or time zone fails before anything starts
    except ScheduleError as e:
        fail(str(e), EXIT_CONFIG)
    tasks = ctx.tasks()
    nightly_names = ctx.settings.nightly_task_names()
    for name in nightly_names:
        ctx.task(name)  # a typo in FLEET_NIGHTLY_TASKS fails before anything starts
    s = ctx.services()
    app = install(ctx.app(), s, tasks)
    setup_logging(loglevel, json_lines=s.log_json)
    folder = s.state_dir / "beat"
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(
        f"fleet beat: nightly at '{s.nightly_crontab}' ({s.timezone}) over "
        f"{', '.join(nightly_names or tasks)}; feed tick every {s.beat_feed_seconds:g}s, reconcile every "
        f"{s.beat_reconcile_seconds:g}s; control worker on {CONTROL_QUEUE}",
        err=True,
    )
    # Beat runs in a forked child: no pooled database connection crosses the fork.
    dispose_all()
    code = app.start(
        [
            "worker",
            "--beat",
            "--schedule-filename",
            str(folder / "schedule"),
            "-Q",
            CONTROL_QUEUE,
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "-n",
            "control@%h",
            "--loglevel",
            loglevel,
            "-E",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return int(code or 0)
