"""Watching the fleet: `fleet status`, `watch`, `metrics` (Prometheus) and `flower`."""

from __future__ import annotations

import sys

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option


def _warn(message: str) -> None:
    """A line for the operator on stderr (stdout stays for the served output)."""
    click.echo(message, err=True)


@click.command("status")
@click.option("--task", "-t", "task_name", help="Only this task.")
@json_option
@pass_fleet
def status_cmd(ctx: FleetContext, task_name: str | None, as_json: bool) -> None:
    """Per task: items by status, items/s, ETA, queue length; live workers; the latest run."""
    from fleet.observe.statusview import show_status

    if task_name:
        ctx.task(task_name)
    sys.exit(show_status(ctx.services(), only=task_name, as_json=as_json))


@click.command("watch")
@click.option("--task", "-t", "task_name", help="Only this task.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="Seconds."
)
@click.option("--until-done", is_flag=True, help="Exit 0 once nothing is pending/queued/running.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@pass_fleet
def watch_cmd(
    ctx: FleetContext,
    task_name: str | None,
    interval: float,
    until_done: bool,
    timeout: float | None,
) -> None:
    """Live progress bars per task and the workers' state, refreshed in place (Ctrl-C stops)."""
    from fleet.observe.statusview import run_watch

    if task_name:
        ctx.task(task_name)
    s = ctx.services()
    sys.exit(
        run_watch(s, only=task_name, interval=interval, until_done=until_done, timeout=timeout)
    )


@click.command("metrics")
@click.option("--address", help="Listen address (default FLEET_METRICS_ADDRESS).")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port (default FLEET_METRICS_PORT; 0: any free)."
)
@pass_fleet
def metrics_cmd(ctx: FleetContext, address: str | None, port: int | None) -> None:
    """Serve Prometheus metrics: backlog, queue lengths, items/s, per-worker stats."""
    from fleet.observe.prometheus import run_exporter

    s = ctx.services()
    sys.exit(run_exporter(s, address=address, port=port, echo=_warn))


@click.command("flower")
@click.option("--address", help="Listen address (default FLEET_FLOWER_ADDRESS).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default FLEET_FLOWER_PORT).")
@click.option("--no-auth", is_flag=True, help="Serve without a password (warns).")
@pass_fleet
def flower_cmd(ctx: FleetContext, address: str | None, port: int | None, no_auth: bool) -> None:
    """Watch the fleet in Flower on its broker, behind basic auth (FLEET_FLOWER_*)."""
    from fleet.ops.flower import FlowerConfigError, run_flower

    try:
        code = run_flower(ctx.settings, address=address, port=port, no_auth=no_auth, echo=_warn)
    except FlowerConfigError as e:
        fail(str(e), ExitCode.CONFIG)
    sys.exit(code)
