"""`fleet calibrate`: fit the temperature a task's confidences need, from labeled data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option, task_option

if TYPE_CHECKING:
    from fleet.models.labeled import Example


@click.command("calibrate")
@task_option
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labeled examples to fit a temperature on (the `fleet train` formats).",
)
@click.option(
    "--per-label",
    type=click.IntRange(min=1),
    help="Fit on the first N examples of each label in --data (file order): a smaller, "
    "balanced sample when scoring every line is slow (llm_classify on CPU).",
)
@click.option(
    "--gold",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Gold labels (the `fleet eval` format) of items the task has run on: pick a cascade "
    "threshold from their stored confidences (with --target-escalation).",
)
@click.option(
    "--target-escalation",
    type=click.FloatRange(0, 1),
    help="Share of items to send to the task's escalate_to task, e.g. 0.2.",
)
@json_option
@pass_fleet
def calibrate_cmd(
    ctx: FleetContext,
    task_name: str,
    data: Path | None,
    per_label: int | None,
    gold: Path | None,
    target_escalation: float | None,
    as_json: bool,
) -> None:
    """Fit a task's temperature, or pick its cascade threshold.

    --data FILE: temperature scaling (Guo et al. 2017) on labeled examples.
    sequence_classify: rewrites calibration.json in the folder of the task's first
    ladder tier (a multi-label folder: its sigmoid temperature and its per-label
    thresholds.json, from a file of label sets). zero_shot and llm_classify: fits a
    temperature and a bias per label over the raw label scores and prints the task
    options that serve them (`temperature = ...`, `label_bias = {...}`).

    --gold FILE --target-escalation SHARE: the `escalate_below` threshold under which
    SHARE of the task's stored results (those the gold file names) fall, with the
    share of the task's errors those escalations would catch.
    """
    if (data is None) == (gold is None) or (gold is not None) != (target_escalation is not None):
        fail(
            "give --data FILE (fit a temperature) or --gold FILE with --target-escalation "
            "SHARE (pick a cascade threshold)",
            ExitCode.CONFIG,
        )
    if gold is not None and target_escalation is not None:
        _threshold(ctx, task_name, gold, target_escalation, as_json)
        return
    assert data is not None
    from config.taskconfig import resolve_model_path
    from fleet.models.labeled import TrainingDataError, load_labeled
    from fleet.models.temperature import calibrate_folder, fit_task_temperature, scaling_toml

    spec = ctx.task(task_name)
    models_dir = ctx.settings.resolved_models_dir
    try:
        folder = resolve_model_path(spec.ladder[0], models_dir)
        if spec.kind == "sequence_classify" and _multi_label_folder(folder):
            _refit_label_sets(spec, folder, data, as_json)
            return
        examples = load_labeled(data)
        fitted_on = data.name
        if per_label:
            examples = first_per_label(examples, per_label)
            fitted_on = f"{data.name}, first {per_label} per label"
        if spec.kind in ("zero_shot", "llm_classify"):

            def progress(stage: str, done: int, total: int) -> None:
                click.echo(f"{spec.name}: {stage} {done}/{total}", err=True)

            cal, scores = fit_task_temperature(
                spec, models_dir, examples, fitted_on=fitted_on, progress=progress
            )
            where = f"[tasks.{spec.name}]\n{scaling_toml(cal)}"
        elif spec.kind == "sequence_classify":
            cal, both = calibrate_folder(folder, examples, fitted_on=fitted_on)
            scores = {**both["validation"], "configured_temperature": 1.0}
            where = f"{folder}/calibration.json"
        else:
            fail(
                f"task {spec.name!r} is {spec.kind}: temperatures are fitted for "
                "sequence_classify, zero_shot and llm_classify tasks",
                ExitCode.CONFIG,
            )
    except (TrainingDataError, ValueError, OSError) as e:
        fail(str(e), ExitCode.CONFIG)
    if as_json:
        extra = {"label_bias": cal.extra["label_bias"]} if "label_bias" in cal.extra else {}
        click.echo(json.dumps({"temperature": cal.temperature, "where": where, **extra, **scores}))
        return
    click.echo(
        f"{spec.name}: temperature {cal.temperature:.4f} (was {scores['configured_temperature']})"
        f" fitted on {cal.fitted_on} (n={scores['n']}, accuracy {scores['accuracy']:.3f}"
        + (f" -> {scores['accuracy_after']:.3f}" if "accuracy_after" in scores else "")
        + f"); ECE {scores['ece_before']:.3f} -> {scores['ece_after']:.3f}"
    )
    click.echo(f"serve it: {where}")


def _multi_label_folder(folder: Path) -> bool:
    from workers.multilabel import is_multi_label

    config = folder / "config.json"
    return config.is_file() and is_multi_label(json.loads(config.read_text(encoding="utf-8")))


def _refit_label_sets(spec: Any, folder: Path, data: Path, as_json: bool) -> None:
    """A multi-label folder: its temperature and per-label thresholds refitted on `data`
    (label sets), read as its first tier serves (fleet.models.multilabel.calibrate_and_fit)."""
    from fleet.models.labeled import load_labeled
    from fleet.models.multilabel import calibrate_and_fit
    from workers.adapters.windowed import Reading

    tier = spec.ladder[0]
    got = calibrate_and_fit(
        folder,
        load_labeled(data, multi_label=True),
        reading=Reading.from_options(tier.max_length, tier.options),
        fitted_on=data.name,
    )
    cal, val = got["calibration"], got["validation"]
    cuts = {n: f["threshold"] for n, f in got["thresholds"].items()}
    if as_json:
        click.echo(json.dumps({**cal, "thresholds": cuts, "where": str(folder), "scores": val}))
        return
    click.echo(
        f"{spec.name}: temperature {cal['temperature']:.4f} and thresholds "
        + ", ".join(f"{n} {t:.3f}" for n, t in cuts.items())
        + f" fitted on {data.name} (n={val['n']}, micro-F1 {val['micro_f1']:.3f}, macro-F1 "
        f"{val['macro_f1']:.3f}); ECE over label decisions {cal['validation']['ece_before']:.3f}"
        f" -> {cal['validation']['ece_after']:.3f}"
    )
    click.echo(
        f"serve it: {folder}/calibration.json and thresholds.json (workers read them at start)"
    )


def first_per_label(examples: list[Example], n: int) -> list[Example]:
    """The first `n` examples of each label, in file order."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.label, 0) < n:
            seen[ex.label] = seen.get(ex.label, 0) + 1
            out.append(ex)
    return out


def _threshold(ctx: FleetContext, task_name: str, gold: Path, share: float, as_json: bool) -> None:
    from fleet.reporting.export import load_gold
    from fleet.reporting.queries import iter_results
    from workers.cascade import threshold_for_share

    spec = ctx.task(task_name)
    try:
        labels = load_gold(gold)
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    rows: list[tuple[str, str | None, float]] = []
    for r in iter_results(ctx.url(), task=task_name, status="done"):
        want = labels.label_for(str(r["source"]), str(r["external_id"]), shared=False)
        if want is not None and r["confidence"] is not None:
            rows.append((want, r["label"], float(r["confidence"])))
    try:
        threshold = threshold_for_share([c for _, _, c in rows], share)
    except ValueError as e:
        fail(f"{e}: no done result of {task_name!r} has a gold label in {gold}", ExitCode.CONFIG)
    sent = [(g, lab) for g, lab, c in rows if c < threshold]
    errors = sum(1 for g, lab, _ in rows if g != lab)
    caught = sum(1 for g, lab in sent if g != lab)
    report = {
        "task": task_name,
        "escalate_below": round(threshold, 6),
        "n": len(rows),
        "escalated": len(sent),
        "share": len(sent) / len(rows),
        "accuracy": 1 - errors / len(rows),
        "errors": errors,
        "errors_caught": caught,
        "errors_caught_share": caught / errors if errors else None,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    caught_text = f"{caught} of {errors} errors ({caught / errors:.0%})" if errors else "no errors"
    click.echo(
        f"{task_name}: escalate_below = {threshold:.4f} sends {len(sent)} of {len(rows)} "
        f"({len(sent) / len(rows):.1%}); among them {caught_text} of the task's answers"
    )
    target = spec.escalate_to or "<stronger task>"
    click.echo(
        f'serve it: [tasks.{task_name}] escalate_to = "{target}"\n'
        f"          escalate_below = {threshold:.4f}"
    )
