"""`fleet models prepare|pull` and `fleet train`: the models the ladders serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option, task_option

if TYPE_CHECKING:
    from config.taskconfig import TaskSpec


@click.group("models")
def models_cmd() -> None:
    """Prepare the bundled models (convert, train) into FLEET_MODELS_DIR."""


@models_cmd.command("prepare")
@click.option(
    "--only",
    multiple=True,
    help="Prepare only these (intent-minilm, worthiness-minilm, sentiment-minilm, whisper-tiny.en, smollm2-135m-instruct, all-minilm-l6-v2; gemma3-270m only when named).",
)
@click.option("--force", is_flag=True, help="Rebuild even if present.")
@pass_fleet
def models_prepare_cmd(ctx: FleetContext, only: tuple[str, ...], force: bool) -> None:
    """Build every bundled model folder once (seconds to a few minutes on CPU)."""
    from fleet.models.prepare import prepare_models

    for name, path, seconds in prepare_models(
        ctx.settings.resolved_models_dir, only=only, force=force, echo=click.echo
    ):
        click.echo(f"{name:24} {path}  ({seconds:.1f}s)")


@models_cmd.command("pull")
@click.option("--task", "-t", "task_names", multiple=True, help="Only these tasks' ladders.")
@pass_fleet
def models_pull_cmd(ctx: FleetContext, task_names: tuple[str, ...]) -> None:
    """Download every ladder model named by Hugging Face id into the HF cache.

    Run it where the hub is reachable (safetensors, configuration and tokenizer
    files only; no code is ever run from a model repository). Workers then load
    from the cache (HF_HOME) with local files only.
    """
    from wire.hub import ModelNotCached, hub_cache, hub_id, pull, tier_revision

    tasks = ctx.tasks()
    chosen = [ctx.task(n) for n in task_names] if task_names else list(tasks.values())
    models_dir = ctx.settings.resolved_models_dir
    wanted: dict[tuple[str, str | None], str] = {}
    for spec in chosen:
        for tier in spec.ladder:
            repo = hub_id(tier, models_dir)
            if repo is not None:
                wanted.setdefault((repo, tier_revision(tier)), f"{spec.name}/{tier.name}")
    if not wanted:
        click.echo("no ladder tier names a Hugging Face id (org/name): nothing to pull")
        return
    failed = 0
    for (repo, revision), where in wanted.items():
        click.echo(
            f"pulling {repo}{'@' + revision if revision else ''} ({where}) into {hub_cache()}"
        )
        try:
            pull(repo, revision, echo=click.echo)
        except ModelNotCached as e:
            click.echo(f"  {e}", err=True)
            failed += 1
        except Exception as e:  # the hub unreachable, a wrong id, no access
            click.echo(
                f"  cannot download {repo} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "run `fleet models pull` on a machine that can reach huggingface.co "
                "(HF_TOKEN for gated models), then copy its HF_HOME here",
                err=True,
            )
            failed += 1
    if failed:
        sys.exit(int(ExitCode.SERVICE))


_file = click.Path(exists=True, dir_okay=False, path_type=Path)


def _composed(metrics: dict[str, Any]) -> str:
    composed = metrics.get("composed")
    return f" + {composed['added']} composed with {composed['filler']}" if composed else ""


def _compose_options(
    choice: str | None,
    per_example: int | None,
    task: str,
    *,
    bundled_set: bool,
    multi_label: bool,
) -> dict[str, Any]:
    """TrainConfig's `compose_filler` (the file `--compose-with` names, see its help, or
    None for no composing) and `compose_per_example` (`--compose-per-example`, else the
    bundled set's own number when its default filler is used, else 1)."""
    from config.data import data_path
    from fleet.models.catalogue import SMALLTALK, bundled_for_task

    if multi_label:
        if choice not in (None, "none"):
            fail(
                "--compose-with composes single-label examples; not with --multi-label",
                ExitCode.CONFIG,
            )
        return {"compose_filler": None, "compose_per_example": 1}
    shipped = bundled_for_task(task)
    if choice is None:
        if bundled_set and shipped and shipped.filler:
            filler, per = str(data_path(shipped.filler)), shipped.filler_per_example
            return {"compose_filler": filler, "compose_per_example": per_example or per}
        return {"compose_filler": None, "compose_per_example": 1}
    if choice == "none":
        return {"compose_filler": None, "compose_per_example": 1}
    if choice == "bundled":
        choice = str(data_path(SMALLTALK))
    elif not Path(choice).is_file():
        fail(f"--compose-with {choice}: no such file (or say 'bundled' or 'none')", ExitCode.CONFIG)
    return {"compose_filler": choice, "compose_per_example": per_example or 1}


def _calibration_option(
    choice: str | None, task: str, *, bundled_set: bool, multi_label: bool, folds: int
) -> str | None:
    """TrainConfig's `calibration_data`: the file `--calibration-data` names, the
    bundled set's own calibration file ('bundled', or by default when training a
    bundled task's shipped set that has one and no --calibration-folds), or None
    (the held-out split). Exits CONFIG for a missing file, or one given with
    --calibration-folds or --multi-label."""
    from config.data import data_path
    from fleet.models.catalogue import bundled_for_task

    shipped = bundled_for_task(task)
    if choice is None:
        if bundled_set and shipped and shipped.calibration and not folds and not multi_label:
            return str(data_path(shipped.calibration))
        return None
    if choice == "none":
        return None
    if folds or multi_label:
        fail(
            "--calibration-data fits a softmax temperature on a file: not with "
            "--calibration-folds or --multi-label",
            ExitCode.CONFIG,
        )
    if choice == "bundled":
        if not (shipped and shipped.calibration):
            fail(
                f"task {task!r} ships no calibration file: give --calibration-data FILE",
                ExitCode.CONFIG,
            )
        return str(data_path(shipped.calibration))
    if not Path(choice).is_file():
        fail(
            f"--calibration-data {choice}: no such file (or say 'bundled' or 'none')",
            ExitCode.CONFIG,
        )
    return choice


@click.command("train")
@task_option
@click.option(
    "--kind",
    type=click.Choice(["sequence_classify"]),
    help="Create this task when the config has none of that name (with --data).",
)
@click.option(
    "--write-config",
    is_flag=True,
    help="Append the task entry (or ladder tier) to FLEET_CONFIG_FILE instead of only printing it.",
)
@click.option("--data", type=_file, help="Labeled CSV/JSONL/JSON: text,label[,weight|confidence].")
@click.option(
    "--multi-label",
    is_flag=True,
    help="Several labels per example (CSV text,labels with ';'-separated labels, or JSONL "
    '"labels": [...]): a sigmoid per label, thresholds fitted on the held-out split.',
)
@click.option("--from-task", help="Train on this task's stored results (e.g. llm_classify).")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="With --from-task: keep results at least this confident.",
)
@click.option(
    "--confirmed",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[FILE]",
    help="Alone: add the task's confirmed labels (`fleet review import`) as weight-1.0 "
    'examples. With FILE and --from-task: only items a reviewer confirmed ({"external_id","label"} lines).',
)
@click.option(
    "--base", help="Encoder to start from: a local folder or a cached hub id (default: MiniLM)."
)
@click.option(
    "--eval", "eval_file", type=_file, help="Validation file (default: a split of --data)."
)
@click.option(
    "--test", "test_file", type=_file, help="Independent test file, scored once at the end."
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.05, 0.5),
    default=0.2,
    show_default=True,
    help="Share of each label held out for validation when there is no --eval.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model folder to write (default: FLEET_STATE_DIR/trained/<task>-trained-<time>).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Most epochs (early stopping may end sooner)."
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step.")
@click.option(
    "--patience", type=click.IntRange(min=1), help="Epochs without improvement before stopping."
)
@click.option("--max-length", type=click.IntRange(min=8), help="Tokens per example.")
@click.option(
    "--class-weights",
    type=click.Choice(["balanced", "none"]),
    default=None,
    help="Weigh rare labels up: n / (k * count) per class [default: balanced]; with "
    "--multi-label, negatives / positives per label (capped at 10) [default: none].",
)
@click.option(
    "--calibration-folds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Fit the temperature on out-of-fold logits of K models cross-fitted over all of "
    "--data (K more trainings) instead of on the held-out split; 0: the split. Not with "
    "--multi-label.",
)
@click.option(
    "--calibration-data",
    "calibration_data",
    metavar="FILE|bundled|none",
    default=None,
    help="Fit the temperature on this labeled file (text like what the model will serve, "
    "written apart from --data) instead of the held-out split; 'bundled': the task's "
    "shipped calibration file (sentiment: config/data/sentiment_calibration.jsonl); "
    "'none': the split. Default: the shipped file when training a bundled task's "
    "shipped set that has one, else the split.",
)
@click.option(
    "--compose-with",
    "compose_with",
    metavar="FILE|bundled|none",
    default=None,
    help="Also train on composed conversations: each request among small-talk turns of "
    "FILE (JSONL role/content lines; 'bundled': the shipped config/data/smalltalk.jsonl), "
    "small talk alone labelled as the tier's background_labels, so that long "
    "conversations read in windows are read right. Default: the bundled filler when "
    "training a bundled task's shipped set that uses one, else none.",
)
@click.option(
    "--compose-per-example",
    type=click.IntRange(min=1),
    default=None,
    help="Composed conversations per training request [default: the bundled set's own "
    "number (intent: 2) when composing it by default, else 1].",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seeds the split, the head and the batches."
)
@json_option
@pass_fleet
def train_cmd(
    ctx: FleetContext,
    task_name: str,
    kind: str | None,
    write_config: bool,
    data: Path | None,
    multi_label: bool,
    from_task: str | None,
    min_confidence: float,
    confirmed: str | None,
    base: str | None,
    eval_file: Path | None,
    test_file: Path | None,
    test_fraction: float,
    out: Path | None,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    patience: int | None,
    max_length: int | None,
    class_weights: str | None,
    calibration_folds: int,
    calibration_data: str | None,
    compose_with: str | None,
    compose_per_example: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Fine-tune an encoder for a sequence_classify task from a labeled file, stored results or the bundled set.

    Writes a model folder (safetensors, tokenizer, training_metrics.json, a model
    card), under FLEET_STATE_DIR/trained unless --out says where, and prints the
    TOML lines that serve it (--write-config appends them to FLEET_CONFIG_FILE).
    A task the config lacks is created with --kind sequence_classify and --data:
    its labels are the data's, and the whole task entry is printed.

    --multi-label trains a model that gives each item a set of labels (possibly
    empty): binary cross-entropy per label; calibration.json (one temperature for
    the sigmoids) and thresholds.json (per label, the F1-best threshold on the
    held-out split) are written beside the weights.
    """
    from config.taskconfig import ConfigError
    from fleet.models.finetune import TrainConfig
    from fleet.models.labeled import TrainingDataError
    from fleet.models.taskentry import append_entry, default_out, new_task, task_entry
    from fleet.models.training import Chosen, choose_examples, run_training

    config_file = ctx.settings.config_file
    if calibration_folds == 1 or (calibration_folds and multi_label):
        fail(
            "--calibration-folds takes 0 (the held-out split) or K >= 2, and not --multi-label",
            ExitCode.CONFIG,
        )
    found = _task_to_train(
        ctx, task_name, kind, has_data=bool(data or from_task), write_config=write_config
    )
    creating = found is None
    if found is not None:
        spec = found
    if from_task:
        ctx.task(from_task)
    confirmed_file = None if confirmed in (None, "-") else Path(str(confirmed))
    if confirmed_file is not None and not confirmed_file.is_file():
        fail(f"--confirmed {confirmed_file}: no such file", ExitCode.CONFIG)
    try:
        chosen: Chosen = choose_examples(
            task_name,
            data=data,
            from_task=from_task,
            min_confidence=min_confidence,
            confirmed=confirmed_file,
            db_url=ctx.url,
            models_dir=ctx.settings.resolved_models_dir,
            with_confirmed=confirmed == "-",
            multi_label=multi_label,
        )
        out = out or default_out(ctx.settings.state_dir, chosen.out.name)
        if creating:
            assert kind is not None
            spec = new_task(task_name, kind, out)
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "patience": patience,
                "max_length": max_length,
            }.items()
            if v is not None
        }
        weighting = class_weights or ("none" if multi_label else "balanced")
        config = TrainConfig(
            seed=seed,
            class_weighting=weighting,
            calibration_folds=calibration_folds,
            calibration_data=_calibration_option(
                calibration_data,
                task_name,
                bundled_set=not (data or from_task),
                multi_label=multi_label,
                folds=calibration_folds,
            ),
            **_compose_options(
                compose_with,
                compose_per_example,
                task_name,
                bundled_set=not (data or from_task),
                multi_label=multi_label,
            ),
            **overrides,
        )
        metrics = run_training(
            spec,
            models_dir=ctx.settings.resolved_models_dir,
            examples=chosen.examples,
            data_name=chosen.data_name,
            out=out,
            base=base,
            eval_file=eval_file,
            test_file=test_file or chosen.test_file,
            config=config,
            test_fraction=test_fraction,
            quiet=as_json,
            extra=chosen.extra,
            multi_label=multi_label,
        )
    except (TrainingDataError, ValueError) as e:
        fail(f"{e}", ExitCode.CONFIG)
    except OSError as e:
        if base is None:
            raise
        fail(
            f"cannot load the base model {base!r}: {e}. Give a local folder with config.json, "
            "weights and a tokenizer (hub ids load from the local cache only)",
            ExitCode.CONFIG,
        )
    entry = (
        task_entry(task_name, spec.kind, metrics["labels"], metrics["toml"])
        if creating
        else metrics["toml"]
    )
    if write_config:
        assert config_file is not None
        try:
            append_entry(config_file, entry, task_name)
        except ConfigError as e:
            fail(f"{out} is trained, but {e}", ExitCode.CONFIG)
    if as_json:
        click.echo(
            json.dumps(
                {**metrics, "folder": str(out), "entry": entry, "new_task": creating}
                | ({"written_to": str(config_file)} if write_config else {})
            )
        )
        return
    _say_trained(out, metrics)
    if write_config:
        click.echo(f"task entry appended to {config_file}:\n{entry}")
    elif creating:
        click.echo(f"serve it: add the new task to FLEET_CONFIG_FILE (or --write-config):\n{entry}")
    else:
        click.echo("serve it: add to the task config, at the top of the ladder:\n" + entry)


def _task_to_train(
    ctx: FleetContext, name: str, kind: str | None, *, has_data: bool, write_config: bool
) -> TaskSpec | None:
    """The configured task `fleet train` trains for, or None for one it creates
    (--kind and data given). Exits CONFIG on a missing task, kind or config file."""
    if write_config and ctx.settings.config_file is None:
        fail(
            "--write-config needs FLEET_CONFIG_FILE: point it at a task config of your own "
            "(it extends the bundled tasks); without it the entry is only printed",
            ExitCode.CONFIG,
        )
    if name not in ctx.tasks():
        if kind is None or not has_data:
            fail(
                f"task {name!r} is not configured: give --kind sequence_classify and "
                "--data FILE to create it (`fleet tasks` lists the configured ones)",
                ExitCode.CONFIG,
            )
        return None
    spec = ctx.task(name)
    if kind is not None and kind != spec.kind:
        fail(f"task {name!r} is {spec.kind}, not {kind}", ExitCode.CONFIG)
    return spec


def _say_trained(out: Path, metrics: dict[str, Any]) -> None:
    if metrics.get("multi_label"):
        _say_trained_sets(out, metrics)
        return
    val = metrics["validation_scores"]
    click.echo(
        f"{out}: {metrics['n_train']} examples{_composed(metrics)}, {metrics['epochs_run']} epochs (best "
        f"{metrics['best_epoch']}); validation accuracy {val['accuracy']:.3f}, "
        f"macro-F1 {val['macro_f1']:.3f} (n={val['n']})"
    )
    if metrics.get("test"):
        t = metrics["test"]
        click.echo(
            f"independent test accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f} (n={t['n']})"
        )
    cal = metrics.get("calibration")
    if cal:
        if cal.get("out_of_fold"):
            where = (
                f"out-of-fold logits ({metrics['config']['calibration_folds']}-fold "
                f"cross-fitting; the split alone gave {cal['split_temperature']:.3f})"
            )
        elif cal.get("calibration_set"):
            where = (
                f"{cal['calibration_data']} (n={cal['calibration_set']['n']}, ECE "
                f"{cal['calibration_set']['ece_before']:.3f} -> "
                f"{cal['calibration_set']['ece_after']:.3f}; the split alone gave "
                f"{cal['split_temperature']:.3f})"
            )
        else:
            where = "the held-out split"
        line = (
            f"calibration: temperature {cal['temperature']:.3f} fitted on {where} "
            f"(calibration.json); ECE validation {cal['validation']['ece_before']:.3f} -> "
            f"{cal['validation']['ece_after']:.3f}"
        )
        if cal.get("test"):
            line += f", test {cal['test']['ece_before']:.3f} -> {cal['test']['ece_after']:.3f}"
        click.echo(line)
    ambiguous = (metrics.get("distilled") or {}).get("ambiguous", 0)
    if ambiguous:
        click.echo(
            f"{ambiguous} reviewed results were left out: their id is held by more than one "
            'source; give those --confirmed lines a "source" (a [sources.<name>] name, or '
            '"ingest" for `fleet ingest` rows) to train on them',
            err=True,
        )


def _say_trained_sets(out: Path, metrics: dict[str, Any]) -> None:
    """What `fleet train --multi-label` prints: F1 figures, thresholds, calibration."""

    def line(name: str, s: dict[str, Any]) -> str:
        return (
            f"{name} micro-F1 {s['micro_f1']:.3f}, macro-F1 {s['macro_f1']:.3f}, subset "
            f"accuracy {s['subset_accuracy']:.3f}, Hamming loss {s['hamming_loss']:.3f} (n={s['n']})"
        )

    click.echo(
        f"{out}: {metrics['n_train']} examples{_composed(metrics)}, {metrics['epochs_run']} epochs (best "
        f"{metrics['best_epoch']}); " + line("validation", metrics["validation_scores"])
    )
    if metrics.get("test"):
        click.echo(line("independent test", metrics["test"]))
    fitted = metrics.get("thresholds") or {}
    click.echo(
        "thresholds (thresholds.json, per-label F1 on the held-out split): "
        + ", ".join(
            f"{name} {f['threshold']:.3f}" + ("" if f["fitted"] else " (no held-out positive: 0.5)")
            for name, f in fitted.items()
        )
    )
    cal = metrics.get("calibration")
    if cal:
        click.echo(
            f"calibration: temperature {cal['temperature']:.3f} on the sigmoids "
            f"(calibration.json); ECE over label decisions, validation "
            f"{cal['validation']['ece_before']:.3f} -> {cal['validation']['ece_after']:.3f}"
            + (
                f", test {cal['test']['ece_before']:.3f} -> {cal['test']['ece_after']:.3f}"
                if cal.get("test")
                else ""
            )
        )
