"""Reading the results: `fleet results`, `export`, `eval`, `compare` and `report` (HTML)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option, task_option


@click.command("results")
@task_option
@click.option(
    "--status",
    type=click.Choice(["done", "failed", "dead", "parked", "all"]),
    default="all",
    show_default=True,
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_fleet
def results_cmd(ctx: FleetContext, task_name: str, status: str, limit: int, as_json: bool) -> None:
    """Show a task's results (label, confidence, model, tier) or errors."""
    from fleet.observe.display import results_table
    from fleet.reporting.queries import fetch_results

    rows = fetch_results(ctx.url(), task=task_name, status=status, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, default=str))
    else:
        results_table(rows, title=f"{task_name}: {status}")


@click.command("export")
@task_option
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "--status",
    type=click.Choice(["done", "failed", "dead", "parked", "all"]),
    default="all",
    show_default=True,
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: stdout).",
)
@click.option("--individual", is_flag=True, help="One JSON file per item in --output-dir.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for --individual.",
)
@pass_fleet
def export_cmd(
    ctx: FleetContext,
    task_name: str,
    fmt: str,
    status: str,
    output: Path | None,
    individual: bool,
    output_dir: Path | None,
) -> None:
    """Export a task's results (streamed) as JSONL or CSV, or one file per item."""
    from fleet.reporting.export import export as do_export

    if individual and output_dir is None:
        fail("--individual needs --output-dir DIR", ExitCode.CONFIG)
    url = ctx.url()
    if individual:
        n = do_export(
            url, task=task_name, fmt=fmt, out=None, status=status, individual_dir=output_dir
        )
        click.echo(f"wrote {n} files to {output_dir}", err=True)
        return
    if output is None:
        n = do_export(url, task=task_name, fmt=fmt, out=sys.stdout, status=status)
    else:
        with output.open("w", newline="") as f:
            n = do_export(url, task=task_name, fmt=fmt, out=f, status=status)
    click.echo(f"exported {n} items", err=True)


@click.command("eval")
@task_option
@click.option(
    "--gold",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL of {"external_id", "label"[, "source"]}, or "labels": [...] for a multi-label '
    "task (default: the confirmed labels `fleet review import` stored).",
)
@click.option(
    "--source",
    metavar="NAME",
    help="score only this source's rows; `ingest` for rows read by `fleet ingest`",
)
@json_option
@pass_fleet
def eval_cmd(
    ctx: FleetContext, task_name: str, gold: Path | None, source: str | None, as_json: bool
) -> None:
    """Score a task's stored results against gold labels: accuracy, macro-F1, confusion, latency.

    A multi-label task (gold lines with "labels": [...], or results with label sets):
    micro- and macro-F1, per-label precision/recall/F1, subset accuracy, Hamming loss.
    """
    from fleet.observe.display import confusion_table
    from fleet.reporting.export import evaluate, load_gold

    try:
        if gold is None:
            from fleet.review.gold import confirmed_gold

            labels = confirmed_gold(ctx.url(), task=task_name)
            if not labels:
                fail(
                    f"task {task_name!r} has no confirmed labels: import reviews with "
                    "`fleet review import FILE`, or give --gold FILE",
                    ExitCode.CONFIG,
                )
        else:
            labels = load_gold(gold)
        spec = ctx.task(task_name)
        report = evaluate(
            ctx.url(), task=task_name, gold=labels, source=source, model_labels=list(spec.labels)
        )
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    if as_json:
        click.echo(json.dumps(report))
        return
    if report.get("multi_label"):
        from fleet.observe.display import per_label_table

        per_label_table(report["per_label"])
        click.echo(
            f"micro-F1 {report['micro_f1']:.3f}  macro-F1 {report['macro_f1']:.3f}  subset "
            f"accuracy {report['subset_accuracy']:.3f}  Hamming loss {report['hamming_loss']:.3f}  "
            f"n={report['n']}  (empty sets given: {report['empty_predicted']}, no answer: "
            f"{report['no_prediction']})"
        )
    else:
        confusion_table(report["confusion"])
    lat = report["latency_ms"]
    spread = (
        f"p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} over {lat['sub_batches']} sub-batches"
        if lat["sub_batches"] > 1
        else "(one sub-batch: no p50/p95, every item has its mean)"
    )
    head = (
        ""
        if report.get("multi_label")
        else f"accuracy {report['accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  n={report['n']}  "
    )
    click.echo(f"{head}latency/item mean {lat['mean']:.1f} ms {spread}")
    click.echo(
        f"ECE {report['ece']:.3f} (10 bins"
        + (", a set right when it is the gold set" if report.get("multi_label") else "")
        + f")  mean confidence {report['mean_confidence']:.3f}"
    )
    if report["unknown_gold_labels"]:
        unknown = ", ".join(f"{k} ({n})" for k, n in report["unknown_gold_labels"].items())
        click.echo(
            f"warning: gold labels the model does not have: {unknown}; those lines can only "
            "count as errors (a typo in the gold file, or a model trained on other labels?)",
            err=True,
        )
    if report["uncalibrated"]:
        click.echo(
            f"{report['uncalibrated']} results came from a model folder without calibration.json: "
            "their confidences are the raw softmax (retrain with `fleet train`, which fits a "
            "temperature)",
            err=True,
        )
    if report["not_in_task"] or report["not_done"]:
        click.echo(
            f"{report['not_in_task']} gold items have no work item; {report['not_done']} are not done",
            err=True,
        )
    if report["ambiguous"]:
        click.echo(
            f"{report['ambiguous']} gold ids are held by more than one source and were not "
            "scored; pass --source NAME to score one source's rows, or give those gold lines "
            'a "source"',
            err=True,
        )
    if report["other_source"]:
        click.echo(
            f"{report['other_source']} gold lines name another source than {source!r} and "
            "were left out",
            err=True,
        )


@click.command("compare")
@task_option
@click.option(
    "--models",
    nargs=2,
    required=True,
    metavar="A B",
    help="Two model folders (or names under FLEET_MODELS_DIR).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Items to run both on.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("compare.jsonl"),
    show_default=True,
    help="Side-by-side answers, one line per item.",
)
@json_option
@pass_fleet
def compare_cmd(
    ctx: FleetContext,
    task_name: str,
    models: tuple[str, str],
    limit: int,
    output: Path,
    as_json: bool,
) -> None:
    """Shadow run: two models on the same items; the disagreement rate and where they differ.

    Both models run here, in this process, one after the other (not on the
    workers): on a CPU that takes minutes for a few hundred items. Each model's
    time is printed (and under "seconds" with --json).
    """
    from transformers.utils import logging as hf_logging

    from fleet.reporting.compare import compare as do_compare

    spec = ctx.task(task_name)
    hf_logging.disable_progress_bar()  # no weight-loading bars: one line per model instead
    if not as_json:
        click.echo(
            f"comparing on up to {limit} items of {task_name}: both models run in this "
            "process, one after the other (not on the workers)",
            err=True,
        )
    report = do_compare(
        ctx.services(),
        spec,
        models[0],
        models[1],
        limit=limit,
        out_path=output,
        echo=None if as_json else (lambda line: click.echo(line, err=True)),
    )
    if as_json:
        click.echo(json.dumps(report))
        return
    took = report["seconds"]
    click.echo(
        f"{report['n']} items: disagreement {report['disagreement_rate']:.1%}; side by side in "
        f"{report['file']} (in this process on {report['device']}: A {took['a']:.1f}s, "
        f"B {took['b']:.1f}s)"
    )
    for d in report["top_disagreements"]:
        click.echo(f"  A={d['a']}  B={d['b']}  x{d['count']}")


@click.command("report")
@click.option(
    "--run", "run_id", type=click.IntRange(min=1), help="Report on this run (default: the latest)."
)
@click.option("--since", help="Window start: 2026-01-05, 2026-01-05T22:00, today, or 24h / 7d ago.")
@click.option("--until", help="Window end (with --since; default now).")
@click.option("--task", "-t", "task_names", multiple=True, help="Only this task; repeat.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("fleet-report.html"),
    show_default=True,
    help="HTML file to write (one page, nothing external).",
)
@click.option(
    "--gold",
    "gold_specs",
    multiple=True,
    metavar="TASK=FILE",
    help="Gold labels of a task (the `fleet eval` format): draws its reliability diagram; repeat.",
)
@pass_fleet
def report_cmd(
    ctx: FleetContext,
    run_id: int | None,
    since: str | None,
    until: str | None,
    task_names: tuple[str, ...],
    out: Path,
    gold_specs: tuple[str, ...],
) -> None:
    """Write one self-contained HTML page: throughput, labels, calibration, tiers, failures.

    With no option, the latest run. A run's figures are what it did: items it
    finished, and results it made that were replaced since (result_history).
    A --since window's items/s divide by the busy time (idle pauses left out).
    """
    from fleet.reporting.html import ReportError, fmt_duration, write_report

    gold: dict[str, Path] = {}
    for spec in gold_specs:
        task, sep, file = spec.partition("=")
        if not sep or not task or not Path(file).is_file():
            fail(f"--gold takes TASK=FILE with an existing file, got {spec!r}", ExitCode.CONFIG)
        ctx.task(task)
        gold[task] = Path(file)
    try:
        data = write_report(
            ctx.url(), out, run_id=run_id, since=since, until=until, tasks=task_names, gold=gold
        )
    except (ReportError, ValueError) as e:
        fail(str(e), ExitCode.CONFIG)
    t = data.total
    click.echo(
        f"wrote {out}: {t.items} items (done {t.done}, failed {t.failed}, dead {t.dead}) "
        f"over {fmt_duration(data.duration_s)}"
    )
