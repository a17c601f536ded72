"""`fleet calibrate`: fit the temperature a task's confidences need, from labeled data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option, task_option
from fleet.config.exitcodes import ExitCode


@click.command()
@task_option
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Labeled examples to fit on (the `fleet train` formats); never an evaluation set.",
)
@json_option
@pass_fleet
def calibrate(ctx: FleetContext, task_name: str, data: Path, as_json: bool) -> None:
    """Fit a task's temperature (Guo et al. 2017) on labeled examples.

    sequence_classify: rewrites calibration.json in the folder of the task's first
    ladder tier. zero_shot: prints the fitted similarity temperature and the task
    option line that serves it (`temperature = ...`).
    """
    from fleet.config.taskconfig import resolve_model_path
    from fleet.models.labeled import TrainingDataError, load_labeled
    from fleet.models.temperature import calibrate_folder, fit_task_temperature

    spec = ctx.task(task_name)
    models_dir = ctx.settings.resolved_models_dir
    try:
        examples = load_labeled(data)
        if spec.kind == "zero_shot":
            cal, scores = fit_task_temperature(spec, models_dir, examples, fitted_on=data.name)
            where = f"[tasks.{spec.name}] temperature = {cal.temperature:.4f}"
        elif spec.kind == "sequence_classify":
            folder = resolve_model_path(spec.ladder[0], models_dir)
            cal, both = calibrate_folder(folder, examples, fitted_on=data.name)
            scores = {**both["validation"], "configured_temperature": 1.0}
            where = f"{folder}/calibration.json"
        else:
            fail(
                f"task {spec.name!r} is {spec.kind}: temperatures are fitted for "
                "sequence_classify and zero_shot tasks (llm_classify calibrates its label "
                "scores against a content-free input)",
                ExitCode.CONFIG,
            )
    except (TrainingDataError, ValueError, OSError) as e:
        fail(str(e), ExitCode.CONFIG)
    if as_json:
        click.echo(json.dumps({"temperature": cal.temperature, "where": where, **scores}))
        return
    click.echo(
        f"{spec.name}: temperature {cal.temperature:.4f} (was {scores['configured_temperature']})"
        f" fitted on {data.name} (n={scores['n']}, accuracy {scores['accuracy']:.3f}); "
        f"ECE {scores['ece_before']:.3f} -> {scores['ece_after']:.3f}"
    )
    click.echo(f"serve it: {where}")
