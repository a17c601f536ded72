"""`fleet review export|import|release`: the queue people review and the labels they give back."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from config.exitcodes import ExitCode
from config.taskconfig import TaskSpec
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option, task_option


@click.group("review")
def review_cmd() -> None:
    """Hand items to people for review (Label Studio) and store what they confirm."""


def _labels(ctx: FleetContext, task: str) -> list[str] | None:
    from fleet.models.training import task_labels

    return task_labels(ctx.task(task), ctx.settings.resolved_models_dir)


@review_cmd.command("export")
@task_option
@click.option(
    "--budget", "-n", type=click.IntRange(min=1), required=True, help="Items to hand out."
)
@click.option(
    "--strategy",
    type=click.Choice(["uncertainty", "margin", "disagreement", "diverse", "random"]),
    default="uncertainty",
    show_default=True,
    help="How to pick (see docs/architecture.md, the review loop).",
)
@click.option("--against", metavar="TASK", help="With disagreement: the other task's answers.")
@click.option("--since", type=click.DateTime(), help="Only results made at or after this time.")
@click.option("--source", metavar="NAME", help="Only this source's rows ('ingest': fleet ingest).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Label Studio tasks JSON; .jsonl and .xml (labeling config) are written beside it.",
)
@click.option(
    "--hold-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=72.0,
    show_default=True,
    help="Items stay out for review this long unless imported or released.",
)
@click.option("--seed", default=0, show_default=True, help="Seeds random and diverse picks.")
@json_option
@pass_fleet
def export_cmd(
    ctx: FleetContext,
    task_name: str,
    budget: int,
    strategy: str,
    against: str | None,
    since: dt.datetime | None,
    source: str | None,
    out: Path,
    hold_hours: float,
    seed: int,
    as_json: bool,
) -> None:
    """Write the items to review next as Label Studio tasks (with the fleet's answer
    as a pre-annotation) and JSONL, and hold them so another export skips them."""
    from fleet.review.queue import export_queue

    spec = ctx.task(task_name)
    if against:
        ctx.task(against)
    labels = _labels(ctx, task_name) or []
    try:
        report = export_queue(
            ctx.url(),
            spec,
            budget=budget,
            strategy=strategy,
            out=out,
            labels=labels,
            since=since.replace(tzinfo=dt.UTC) if since and since.tzinfo is None else since,
            source=source,
            against=against,
            hold_hours=hold_hours,
            seed=seed,
            max_chars=ctx.settings.max_text_chars,
            models_dir=ctx.settings.resolved_models_dir,
        )
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    if as_json:
        click.echo(json.dumps(report.__dict__))
        return
    click.echo(
        f"export {report.export_id}: {report.held} items held for review ({strategy}, "
        f"{report.candidates} candidates) -> {out}"
    )
    if report.lost_to_other_export:
        click.echo(
            f"{report.lost_to_other_export} picked items were taken by another export", err=True
        )
    if not labels:
        click.echo(
            f"task {task_name!r} declares no label set: the labeling config has no choices; "
            "add `labels` to the task config",
            err=True,
        )


@review_cmd.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--task", "-t", "task_name", help="Task for lines that name none.")
@json_option
@pass_fleet
def import_cmd(ctx: FleetContext, file: Path, task_name: str | None, as_json: bool) -> None:
    """Store reviewed labels from a Label Studio JSON export or JSONL
    ({"source","external_id","task","label","reviewer"}); lines that cannot be used
    are listed with the reason, the rest imported (exit 1 when any was refused)."""
    from fleet.review.importer import import_reviewed, read_reviewed

    try:
        lines = read_reviewed(file)
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    tasks = ctx.tasks()
    if task_name:
        ctx.task(task_name)
    wanted = {str(line.task or task_name) for line in lines} & set(tasks)
    label_sets = {t: (_labels(ctx, t) if t in wanted else None) for t in tasks}
    report = import_reviewed(
        ctx.url(), lines, label_sets=label_sets, default_task=task_name, origin=file.name
    )
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(
            f"imported {report.imported} of {report.read} reviewed labels "
            f"({report.confirmed} confirmed the model, {report.corrected} corrected it)"
        )
        unchecked = sorted(t for t in wanted if label_sets.get(t) is None)
        if unchecked:
            click.echo(
                f"labels not checked for {', '.join(unchecked)}: no label set declared", err=True
            )
        for where, reason in report.problems:
            click.echo(f"  not imported: {where}: {reason}", err=True)
    if report.problems:
        sys.exit(int(ExitCode.FAILED_ITEMS))


@review_cmd.command("release")
@task_option
@click.option("--export", "export_id", help="Only this export's items (its id).")
@pass_fleet
def release_cmd(ctx: FleetContext, task_name: str, export_id: str | None) -> None:
    """Put items out for review back into the queue (all of the task's, or one export's)."""
    from db import review as rq
    from db.engine import transaction

    ctx.task(task_name)
    with transaction(ctx.url()) as session:
        n = rq.release(session, task=task_name, export_id=export_id)
    click.echo(f"released {n} items of {task_name}")


def _effective_task(ctx: FleetContext, name: str) -> TaskSpec:
    """The task with the ladder workers serve: the config's, or the one promoted."""
    from config.taskconfig import with_ladders
    from db.engine import transaction
    from db.ladders import all_overrides

    ctx.task(name)
    with transaction(ctx.url()) as session:
        return with_ladders(ctx.tasks(), all_overrides(session))[name]


@click.command("promote")
@task_option
@click.option("--model", required=True, help="Candidate: a model folder or a cached hub id.")
@click.option(
    "--gold",
    "gold_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Gold files scored besides the confirmed labels (fleet eval --gold format).",
)
@click.option("--f1-margin", default=0.02, show_default=True, help="Macro-F1 may drop this much.")
@click.option(
    "--max-share-shift", default=0.15, show_default=True, help="Largest change of a label's share."
)
@click.option("--max-ece", default=0.15, show_default=True, help="Largest calibration error.")
@click.option("--min-gold", default=20, show_default=True, help="Fewest gold items to decide on.")
@click.option("--sample", default=50, show_default=True, help="Stored items per label (shadow).")
@json_option
@pass_fleet
def promote_cmd(
    ctx: FleetContext,
    task_name: str,
    model: str,
    gold_files: tuple[Path, ...],
    f1_margin: float,
    max_share_shift: float,
    max_ece: float,
    min_gold: int,
    sample: int,
    as_json: bool,
) -> None:
    """Serve a new model for a task if it passes the gates (macro-F1 on confirmed labels
    and gold files, label share shift, calibration); its items are then run again,
    their old labels served until the new ones land. A failed gate changes nothing."""
    from fleet.review.gates import GateLimits
    from fleet.review.promote import apply, check_candidate

    spec = _effective_task(ctx, task_name)
    limits = GateLimits(f1_margin, max_share_shift, max_ece, min_gold)
    try:
        check = check_candidate(
            ctx.settings,
            spec,
            model,
            gold_files=list(gold_files),
            limits=limits,
            sample_per_label=sample,
        )
    except (OSError, ValueError) as e:
        fail(f"cannot score candidate {model!r}: {e}", ExitCode.CONFIG)
    result = {**check.as_dict()}
    if check.passed:
        oid, moved = apply(ctx.url(), spec, check)
        result.update(promotion=oid, items_back=moved)
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        for g in check.gates:
            click.echo(f"  {'pass' if g.passed else 'FAIL'}  {g.name:12} {g.detail}")
        if check.passed:
            click.echo(
                f"promoted {model} for {task_name} (promotion {result['promotion']}): "
                f"{result['items_back']} items will be relabelled, old labels served until then; "
                "restart the task's workers to load it (`fleet rollback` undoes it)"
            )
    if not check.passed:
        failed = ", ".join(g.name for g in check.gates if not g.passed)
        click.echo(f"refused: gate(s) {failed} failed; nothing changed", err=True)
        sys.exit(int(ExitCode.FAILED_ITEMS))


@click.command("rollback")
@task_option
@json_option
@pass_fleet
def rollback_cmd(ctx: FleetContext, task_name: str, as_json: bool) -> None:
    """Undo the task's newest promotion: its previous results restored from
    result_history in one transaction (no model runs) and the previous ladder served."""
    from db.engine import transaction
    from db.ladders import rollback as do_rollback

    ctx.task(task_name)
    with transaction(ctx.url()) as session:
        done = do_rollback(session, task=task_name)
    if done is None:
        fail(f"task {task_name!r} has no promotion to roll back", ExitCode.CONFIG)
    oid, restored = done
    if as_json:
        click.echo(json.dumps({"promotion": oid, "restored": restored}))
        return
    click.echo(
        f"rolled back promotion {oid} of {task_name}: {restored} results restored; "
        "restart the task's workers to serve the previous ladder"
    )
