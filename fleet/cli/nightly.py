"""`fleet nightly` and `fleet beat`: the nightly job, once or on a schedule.

`fleet nightly` drives one nightly run in the foreground (cron, a Kubernetes
CronJob). `fleet beat` runs one process: a Celery worker on the control queue
(no model) with beat embedded, which sends the nightly, feed-tick and
reconcile tasks of `producer.schedule` to it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import finish_run, json_option, local_workers_option
from fleet.ops.pool import unwind_on_sigterm


@click.command("nightly")
@click.option(
    "--task", "-t", "task_names", multiple=True, help="Only these tasks (default: every one)."
)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 4).")
@local_workers_option
@json_option
@pass_fleet
def nightly_cmd(
    ctx: FleetContext,
    task_names: tuple[str, ...],
    timeout: float | None,
    local_workers: bool | None,
    as_json: bool,
) -> None:
    """Run the nightly job once in the foreground (cron, Kubernetes CronJob).

    Discovers and runs every configured task, records a `runs` row (trigger
    nightly). A nightly run still going elsewhere: says which, exits 0. With
    --local-workers, one command on one machine starts the workers it needs.
    """
    from fleet.ops.localworkers import LocalWorkersFailed, drive_with_local_workers, wanted
    from producer.drive import run_specs
    from producer.nightly import drive
    from producer.runlock import RunStillGoing

    local = wanted(local_workers, ctx.settings)  # before services() fills in the URLs
    names = list(task_names) or ctx.settings.nightly_task_names()
    for name in names:
        ctx.task(name)  # a typo (also in FLEET_NIGHTLY_TASKS) fails here, with the list of tasks
    specs = run_specs(ctx.tasks(), names or None)
    if not specs:
        fail(
            f"no tasks to run: the task config ({ctx.settings.config_file or 'bundled tasks.toml'}) "
            "has none. Add [tasks.<name>] to FLEET_CONFIG_FILE, or drop its "
            "`include_bundled = false`; `fleet tasks` lists what is configured.",
            ExitCode.CONFIG,
        )
    s = ctx.services()
    app = ctx.app()
    unwind_on_sigterm()
    try:
        # Workers start on the loop's first pass, once this process drives the run.
        report = drive_with_local_workers(
            specs,
            s,
            lambda progress, gate: drive(
                s.db_url(), app, specs, s, timeout=timeout, progress=progress, gate=gate
            ),
            enabled=local,
            quiet=as_json,
        )
    except LocalWorkersFailed as e:
        fail(str(e), ExitCode.CONFIG)
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
    if not as_json:
        for line in sync_lines(report.sync):
            click.echo(line)
    finish_run(report, as_json)


def sync_lines(synced: dict[str, Any]) -> list[str]:
    """What a nightly run's sync did, one line per source (and the rerun of
    stale results); a line saying none is declared when there is nothing."""
    if "error" in synced and len(synced) == 1:
        return [f"sync: sources not read: {synced['error']}"]
    lines = []
    for name, r in synced.items():
        if name == "rerun":
            back = ", ".join(f"{t}: {n}" for t, n in r.items()) or "none"
            lines.append(f"rerun of results from old model revisions: {back}")
        elif r.get("error"):
            lines.append(f"sync {name}: FAILED ({r['error']}); `fleet sync` to retry")
        else:
            bad = (
                f", {r['bad_count']} bad (`fleet sync --json` lists them)" if r["bad_count"] else ""
            )
            lines.append(
                f"sync {name}: {r['new']:,} new, {r['changed']:,} changed, "
                f"{r['unchanged']:,} unchanged, {r['gone'] + r['deleted']:,} gone{bad} "
                f"in {r['seconds']:.1f}s"
            )
    return lines or ["sync: no [sources.<name>] declared; nothing synced"]


@click.command("beat")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_fleet
def beat_cmd(ctx: FleetContext, loglevel: str) -> None:
    """Run the schedule: Celery beat plus a control worker on fleet.control (no model).

    Nightly on FLEET_NIGHTLY_CRONTAB (FLEET_TIMEZONE), a feed tick every
    FLEET_BEAT_FEED_SECONDS, the reconciler every FLEET_BEAT_RECONCILE_SECONDS.
    """
    from config.logs import setup_logging
    from db.engine import dispose_all
    from fleet.ops.workercommand import control_worker_args
    from producer.schedule import ScheduleError, beat_schedule, install
    from wire.keys import CONTROL_QUEUE

    try:
        beat_schedule(ctx.settings)  # a bad crontab or time zone fails before anything starts
    except ScheduleError as e:
        fail(str(e), ExitCode.CONFIG)
    tasks = ctx.tasks()
    if not tasks:
        fail("no tasks configured: `fleet tasks` shows the task config in force", ExitCode.CONFIG)
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
        control_worker_args(folder / "schedule", queue=CONTROL_QUEUE, loglevel=loglevel)
    )
    sys.exit(int(code or 0))
