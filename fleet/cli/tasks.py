"""`fleet tasks`: the task config in force (the bundled tasks.toml extended by
FLEET_CONFIG_FILE): every task with its kind, source, labels and model ladder,
and the declared sources.
"""

from __future__ import annotations

import json
from typing import Any

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option


def describe_config(ctx: FleetContext) -> dict[str, Any]:
    """The config in force as plain data: {"config_file", "tasks": [...], "sources": [...]}.

    Each task: name, kind, source, origin ("bundled" or the file), queue, labels
    (list), input_from, then, ladder (name, path, resolved path, present on
    disk). Each source: name, kind, shape, table or query, on_delete."""
    from config.taskconfig import ConfigError, resolve_model_path, task_origins

    try:
        origins = task_origins(ctx.settings.config_file)
    except ConfigError as e:
        fail(str(e), ExitCode.CONFIG)
    models_dir = ctx.settings.resolved_models_dir
    tasks = []
    for spec in ctx.tasks().values():
        ladder = []
        for tier in spec.ladder:
            where = resolve_model_path(tier, models_dir)
            ladder.append(
                {
                    "name": tier.name,
                    "path": tier.path,
                    "resolved": str(where),
                    "present": where.exists(),
                }
            )
        tasks.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "source": spec.source,
                "origin": origins.get(spec.name, "bundled"),
                "queue": spec.queue,
                "labels": list(spec.labels),
                "input_from": spec.input_from,
                "then": list(spec.then),
                "ladder": ladder,
            }
        )
    sources = [
        {
            "name": src.name,
            "kind": src.kind,
            "shape": src.shape,
            "table": src.table,
            "query": src.query,
            "on_delete": src.on_delete,
        }
        for src in ctx.sources().values()
    ]
    return {
        "config_file": str(ctx.settings.config_file) if ctx.settings.config_file else None,
        "tasks": tasks,
        "sources": sources,
    }


@click.command("tasks")
@json_option
@pass_fleet
def tasks_cmd(ctx: FleetContext, as_json: bool) -> None:
    """List the configured tasks, their model ladders and the declared sources.

    The bundled tasks.toml, extended by FLEET_CONFIG_FILE (a task of the same
    name there replaces the bundled one; `include_bundled = false` in the file
    drops the bundled tasks). A tier whose model folder is missing is marked.
    """
    got = describe_config(ctx)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    click.echo(
        f"task config: bundled tasks.toml + {got['config_file'] or '(no FLEET_CONFIG_FILE)'}"
    )
    if not got["tasks"]:
        click.echo("no tasks configured: add [tasks.<name>] to FLEET_CONFIG_FILE")
    for t in got["tasks"]:
        follow = f", input from {t['input_from']}" if t["input_from"] else ""
        then = f", then {', '.join(t['then'])}" if t["then"] else ""
        click.echo(f"\n{t['name']}  ({t['kind']} over {t['source']}{follow}{then}; {t['origin']})")
        if t["labels"]:
            click.echo(f"  labels: {', '.join(t['labels'])}")
        for i, tier in enumerate(t["ladder"]):
            mark = "" if tier["present"] else "  [missing: `fleet models prepare` or `fleet train`]"
            click.echo(f"  tier {i}: {tier['name']} -> {tier['resolved']}{mark}")
    click.echo("\nsources:" if got["sources"] else "\nsources: none declared ([sources.<name>])")
    for src in got["sources"]:
        what = f"table {src['table']}" if src["table"] else "query"
        click.echo(
            f"  {src['name']}  ({src['kind']}, {src['shape']}, {what}, on delete: {src['on_delete']})"
        )
