"""`fleet demo`: the whole job once, on one machine (the work is in fleet.ops.demo)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, pass_fleet


def _warn(message: str) -> None:
    click.echo(message, err=True)


@click.command("demo")
@click.option(
    "--conversations",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL to classify instead of the bundled samples.",
)
@click.option("--timeout", type=float, default=900, show_default=True)
@pass_fleet
def demo_cmd(ctx: FleetContext, conversations: Path | None, timeout: float) -> None:
    """Run the whole job once: prepare models, ingest samples, start a worker, classify, show results."""
    from fleet.ops.demo import run_demo
    from fleet.ops.localworkers import LocalWorkersFailed

    try:
        code = run_demo(
            ctx, conversations=conversations, timeout=timeout, echo=click.echo, warn=_warn
        )
    except LocalWorkersFailed as e:
        _warn(str(e))
        code = ExitCode.CONFIG
    sys.exit(int(code))
