"""`fleet worker` and `fleet workers`: the Celery workers that hold a task's model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import task_option


@click.command("worker")
@task_option
@click.option(
    "--gpu",
    type=click.IntRange(min=0),
    help="Pin to this GPU index (CUDA_VISIBLE_DEVICES). Unset: CPU.",
)
@click.option("--loglevel", default="INFO", show_default=True)
@pass_fleet
def worker_cmd(ctx: FleetContext, task_name: str, gpu: int | None, loglevel: str) -> None:
    """Start one solo-pool Celery worker for a task, holding its model resident."""
    from fleet.ops.workercommand import worker_argv, worker_env, worker_name

    ctx.task(task_name)  # fail here, with the list of tasks, on a typo
    # The worker replaces this process: its pid names it.
    name = worker_name(task_name, gpu=gpu, unique=str(os.getpid()))
    argv = worker_argv(task_name, gpu=gpu, loglevel=loglevel, hostname=name)
    os.execvpe(argv[0], argv, worker_env(ctx.settings, gpu=gpu))


@click.command("workers")
@task_option
@click.option(
    "--gpus",
    default="all",
    show_default=True,
    help="'all' visible GPUs, or indexes like 0,1,3 (indexes this host lacks run as CPU stand-ins).",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each worker's log to DIR/<task>-gpuN.log instead of this terminal.",
)
@pass_fleet
def workers_cmd(
    ctx: FleetContext, task_name: str, gpus: str, loglevel: str, log_dir: Path | None
) -> None:
    """Start and supervise one pinned worker per GPU; restart any that dies, with backoff."""
    from fleet.ops.gpus import parse_gpus, visible_gpus
    from fleet.ops.supervisor import supervise

    ctx.task(task_name)
    try:
        indexes = parse_gpus(gpus, available=visible_gpus())
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    sys.exit(
        supervise(
            task_name, indexes, ctx.settings, loglevel=loglevel, log_dir=log_dir, echo=click.echo
        )
    )
