"""`fleet deploy compose|k8s`: deployment manifests from the task config (deploy/README.md)."""

from __future__ import annotations

from pathlib import Path

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import task_option


@click.group("deploy")
def deploy_cmd() -> None:
    """Generate deployment manifests from the task config (see deploy/README.md)."""


@deploy_cmd.command("compose")
@click.option("--gpus", required=True, help="This host's GPU indexes, e.g. 0,1,2,3 (or 'all').")
@click.option(
    "--task", "-t", "task_options", multiple=True, help="Task, or TASK=0,1 to pin GPUs; repeat."
)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@pass_fleet
def deploy_compose_cmd(
    ctx: FleetContext, gpus: str, task_options: tuple[str, ...], out: Path | None
) -> None:
    """One worker service per GPU (docker-compose.override.yml); default task: intent."""
    from fleet.ops.deploy import compose_command

    try:
        text, plan = compose_command(
            ctx.tasks(),
            gpus,
            task_options,
            config_file=ctx.settings.config_file,
            source_database=ctx.settings.source_database_url is not None,
        )
    except ValueError as e:  # fleet.ops.deploy.DeployError is one
        fail(str(e), ExitCode.CONFIG)
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    click.echo(f"wrote {out}: {len(plan)} worker(s); start them with `docker compose up -d`")


@deploy_cmd.command("k8s")
@task_option
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--list-length",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="KEDA target: batches waiting per worker.",
)
@pass_fleet
def deploy_k8s_cmd(ctx: FleetContext, task_name: str, max_replicas: int, list_length: int) -> None:
    """A task's worker Deployment (one GPU per pod) and its KEDA ScaledObject, as YAML.

    KEDA watches the Redis database of BROKER_URL; with FLEET_CONFIG_FILE the
    task config travels in a ConfigMap (fleet-tasks) the workers mount.
    """
    from fleet.ops.k8s import k8s_command

    spec = ctx.task(task_name)
    broker = ctx.settings.broker_url
    try:
        text = k8s_command(
            spec,
            max_replicas=max_replicas,
            list_length=list_length,
            broker_url=broker.get_secret_value() if broker is not None else None,
            config_file=ctx.settings.config_file,
        )
    except ValueError as e:  # fleet.ops.deploy.DeployError is one
        fail(str(e), ExitCode.CONFIG)
    click.echo(text, nl=False)
