"""The `fleet` command: a thin front door over producer/, workers/ and db/.

One module per family of commands (run, nightly, workers, data, tasks,
models, observe, reports, deploy, demo); the context, `fail` and the exit codes in
`context`, the shared options and the run summary in `output`. Nothing outside
this package imports it. Exit codes: `config.exitcodes.ExitCode`.
"""

from __future__ import annotations

import click

from config.exitcodes import ExitCode
from config.settings import Settings
from fleet.cli import (
    calibrate,
    data,
    demo,
    deploy,
    models,
    nightly,
    observe,
    reports,
    review,
    run,
    tasks,
    workers,
)
from fleet.cli.context import FleetContext, fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpu-fleet")
@click.pass_context
def main(click_ctx: click.Context) -> None:
    """Classify a Postgres backlog of conversations and audio with a Celery GPU fleet.

    With DATABASE_URL and BROKER_URL unset, an embedded Postgres and Redis are
    started under FLEET_STATE_DIR. `fleet demo` runs the whole job once.
    """
    from pydantic import ValidationError

    from config.logs import setup_logging

    try:
        settings = Settings()
    except ValidationError as e:
        fail(f"invalid settings: {e}", ExitCode.CONFIG)
    setup_logging(
        settings.log_level if settings.log_level != "INFO" else "WARNING",
        json_lines=settings.log_json,
    )
    click_ctx.obj = FleetContext(settings)


for _command in (
    data.settings_cmd,
    tasks.tasks_cmd,
    data.migrate_cmd,
    data.ingest_cmd,
    data.sync_cmd,
    data.rerun_cmd,
    run.backlog_cmd,
    run.enqueue_cmd,
    run.run_cmd,
    run.reconcile_cmd,
    run.retry_cmd,
    run.park_cmd,
    reports.results_cmd,
    reports.export_cmd,
    reports.eval_cmd,
    reports.compare_cmd,
    reports.report_cmd,
    workers.worker_cmd,
    workers.workers_cmd,
    models.models_cmd,
    models.train_cmd,
    calibrate.calibrate_cmd,
    demo.demo_cmd,
    observe.status_cmd,
    observe.watch_cmd,
    observe.metrics_cmd,
    observe.flower_cmd,
    nightly.nightly_cmd,
    nightly.beat_cmd,
    deploy.deploy_cmd,
    review.review_cmd,
    review.promote_cmd,
    review.rollback_cmd,
):
    main.add_command(_command)
