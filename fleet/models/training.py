"""`fleet train`: choose the examples, the labels and the folder, then train behind progress bars.

The training itself is `fleet.models.finetune.train_task`; this module decides what
goes into it:

* examples: `--data FILE`, or the stored results of another task
  (`--from-task`, `fleet.models.distill`), or the task's bundled set;
* labels: the task's declared label set (`labels = "..."` in the task config),
  else the label set of the model its ladder serves now, so a retrained
  model answers with the same names; the data must match it exactly;
* where: `--out`, else a new dated folder under FLEET_MODELS_DIR (a bundled
  task's own folder when retraining from its bundled set).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.taskconfig import TaskSpec, resolve_model_path
from fleet.models.finetune import as_served, served_reading, served_tier
from fleet.models.labeled import TrainingDataError


def task_labels(spec: TaskSpec, models_dir: Path) -> list[str] | None:
    """The labels a model for `spec` must have, in id order; None when the task does not say.

    The task config's label set comes first; without one, the label names
    (id2label) of the first ladder folder that exists.
    """
    if spec.labels:
        return list(spec.labels)
    for tier in spec.ladder:
        cfg = resolve_model_path(tier, models_dir) / "config.json"
        if cfg.is_file():
            id2label = json.loads(cfg.read_text()).get("id2label") or {}
            names = [id2label[k] for k in sorted(id2label, key=int)]
            if names and not all(n.startswith("LABEL_") for n in names):
                return names
    return None


@dataclass(frozen=True)
class Chosen:
    """What to train on: the examples, how to name them, the default folder and test file."""

    examples: list[Any]
    data_name: str
    out: Path
    test_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def choose_examples(
    task: str,
    *,
    data: Path | None,
    from_task: str | None,
    min_confidence: float,
    confirmed: Path | None,
    db_url: Callable[[], str],
    models_dir: Path,
    with_confirmed: bool = False,
    multi_label: bool = False,
) -> Chosen:
    """`_choose_examples`, plus (with_confirmed) the task's confirmed labels from the
    database as weight-1.0 examples (fleet.models.confirmed): the reviewer's label
    wins over an example of the same text. Raises TrainingDataError when asked for
    confirmed labels and the task has none.

    `multi_label`: the examples are label sets (`--data FILE` only: stored results,
    confirmed labels and the bundled sets hold one label per item, so they are
    refused with that reason)."""
    if multi_label:
        if from_task or with_confirmed or confirmed or min_confidence or data is None:
            raise TrainingDataError(
                "--multi-label trains on a file of label sets: give --data FILE (CSV "
                "text,labels with ';'-separated labels, or JSONL \"labels\": [...]); stored "
                "results, confirmed labels and the bundled sets hold one label per item"
            )
        from fleet.models.labeled import load_labeled

        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Chosen(
            load_labeled(data, multi_label=True), data.name, models_dir / f"{task}-trained-{stamp}"
        )
    chosen = _choose_examples(
        task,
        data=data,
        from_task=from_task,
        min_confidence=min_confidence,
        confirmed=confirmed,
        db_url=db_url,
        models_dir=models_dir,
    )
    if not with_confirmed:
        return chosen
    from fleet.models.confirmed import confirmed_examples, merge

    found = confirmed_examples(db_url(), task=task)
    if not found.examples:
        raise TrainingDataError(
            f"task {task!r} has no confirmed labels over conversations: import reviews with "
            "`fleet review import FILE` first"
        )
    extra = {
        **chosen.extra,
        "confirmed": {"examples": len(found.examples), "unreadable": found.unreadable},
    }
    return Chosen(
        merge(chosen.examples, found.examples),
        f"{chosen.data_name} + {len(found.examples)} confirmed labels",
        chosen.out,
        test_file=chosen.test_file,
        extra=extra,
    )


def _choose_examples(
    task: str,
    *,
    data: Path | None,
    from_task: str | None,
    min_confidence: float,
    confirmed: Path | None,
    db_url: Callable[[], str],
    models_dir: Path,
) -> Chosen:
    """The training set of `fleet train`: `data`, else `from_task`'s stored results, else
    the task's bundled set (then also its independent eval file and its own folder).

    `db_url` is called only for `from_task`. `confirmed`: reviewed labels in
    the `fleet eval --gold` format (`fleet.reporting.export.load_gold`; a line
    may name its `source`). Raises TrainingDataError for conflicting options,
    no stored results to learn from, or a task without a bundled set and no
    data; ValueError for a bad line in `confirmed`.
    """
    from config.data import data_path
    from fleet.models.catalogue import bundled_for_task
    from fleet.models.labeled import load_labeled

    if data and from_task:
        raise TrainingDataError("give --data or --from-task, not both")
    if (confirmed or min_confidence) and not from_task:
        raise TrainingDataError("--min-confidence and --confirmed go with --from-task")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dated = models_dir / f"{task}-trained-{stamp}"
    if from_task:
        from fleet.models.distill import describe, distilled_examples
        from fleet.reporting.export import load_gold

        reviewed = load_gold(confirmed) if confirmed else None
        examples, rep = distilled_examples(
            db_url(), task=from_task, min_confidence=min_confidence, confirmed=reviewed
        )
        if not examples:
            ambiguous = (
                f", {rep.ambiguous} confirmed by a line without a 'source' while more than "
                "one source holds the id (add the source to those lines: a "
                "`[sources.<name>]` name, or 'ingest' for `fleet ingest` rows)"
                if rep.ambiguous
                else ""
            )
            raise TrainingDataError(
                f"no stored results of {from_task!r} to train on ({rep.seen} done, "
                f"{rep.low_confidence} below --min-confidence, {rep.not_confirmed} not "
                f"confirmed{ambiguous}): run `fleet run --task {from_task}` first or lower "
                "the floor"
            )
        return Chosen(
            examples,
            f"results of {from_task} (confidence >= {min_confidence})",
            dated,
            extra={"distilled": describe(rep, task=from_task, min_confidence=min_confidence)},
        )
    if data:
        return Chosen(load_labeled(data), data.name, dated)
    bundled = bundled_for_task(task)
    if bundled is None:
        raise TrainingDataError(f"task {task!r} has no bundled training set: give --data FILE")
    test = data_path(bundled.eval)
    return Chosen(
        load_labeled(data_path(bundled.data)),
        bundled.data,
        models_dir / bundled.folder,
        test_file=test if test.is_file() else None,
    )


def loss_text(event: dict[str, Any]) -> str:
    """ "loss 0.812", or "loss -" before the trainer has logged one (its first
    `logging_steps`: the value is NaN until then)."""
    loss = event.get("loss")
    return "loss -" if loss is None or loss != loss else f"loss {loss:.3f}"


def training_lines(
    title: str, echo: Callable[[str], None], *, every: float = 10.0
) -> Callable[[dict[str, Any]], None]:
    """Progress as plain lines for logs (output that is not a terminal): a line
    at the first step, then at most every `every` seconds, at each epoch's
    validation and when an evaluation set is done."""
    import time

    last = {"at": -1e9}

    def update(event: dict[str, Any]) -> None:
        stage = event.get("stage")
        now = time.monotonic()
        if stage == "train":
            final = event["step"] >= event["total_steps"]
            if now - last["at"] >= every or final:
                last["at"] = now
                echo(
                    f"train {title}: step {event['step']}/{event['total_steps']} epoch "
                    f"{event['epoch']}/{event['epochs']} {loss_text(event)}"
                )
        elif stage == "epoch" and "eval_macro_f1" in event:
            echo(
                f"train {title}: epoch {event['epoch']} validation macro-F1 "
                f"{event['eval_macro_f1']:.3f}"
            )
        elif stage == "eval" and event["total"] and event["done"] >= event["total"]:
            echo(f"train {title}: evaluated {event['set']} ({event['total']} examples)")

    return update


@contextmanager
def training_progress(title: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A live training bar (steps, epoch, loss, last validation macro-F1) and an
    evaluation bar; on output that is not a terminal (a log), `training_lines`."""
    from fleet.observe.display import console

    if not console.is_terminal:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        yield training_lines(title, lambda line: console.print(line, highlight=False, markup=False))
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers.utils import logging as hf_logging

    # One display: transformers' own bars (weights loading, shard writing) and load reports off.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        train = bar.add_task(f"train {title}", total=None, status="")
        evals: dict[str, Any] = {}
        last = {"f1": ""}

        def update(event: dict[str, Any]) -> None:
            stage = event.get("stage")
            if stage == "train":
                bar.update(
                    train,
                    total=event["total_steps"],
                    completed=event["step"],
                    status=f"epoch {event['epoch']}/{event['epochs']} {loss_text(event)}"
                    + last["f1"],
                )
            elif stage == "epoch" and "eval_macro_f1" in event:
                last["f1"] = f"  val macro-F1 {event['eval_macro_f1']:.3f}"
            elif stage == "eval":
                name = event["set"]
                if name not in evals:
                    evals[name] = bar.add_task(f"evaluate {name}", total=event["total"], status="")
                bar.update(evals[name], total=event["total"], completed=event["done"])
                if event["total"] and event["done"] >= event["total"]:
                    bar.update(evals[name], visible=False)
                    del evals[name]

        yield update


def run_training(
    spec: TaskSpec,
    *,
    models_dir: Path,
    examples: list[Any],
    data_name: str,
    out: Path,
    base: str | None,
    eval_file: Path | None,
    test_file: Path | None,
    config: Any,
    test_fraction: float,
    quiet: bool = False,
    extra: dict[str, Any] | None = None,
    multi_label: bool = False,
) -> dict[str, Any]:
    """Train `spec`'s classifier into `out` (written whole, then moved into place).

    Train as you serve: a config without max_length takes the reading of the tier
    the folder serves (`served_reading`: max_length, pooling, max_windows,
    window_overlap, window_by, turn_context), so examples are windowed as that tier reads conversations; the
    reading is written into the folder's config.json and the printed TOML.

    `multi_label`: `examples` hold label sets, and so must `eval_file` and
    `test_file` (read with `load_labeled(..., multi_label=True)`).

    Raises TrainingDataError for unusable data (see `fleet.models.labeled`) and
    ValueError for a task that is not `sequence_classify`.
    """
    import dataclasses
    import shutil

    from fleet.models.finetune import train_task
    from fleet.models.labeled import load_labeled

    if spec.kind != "sequence_classify":
        raise ValueError(
            f"task {spec.name!r} is {spec.kind}; `fleet train` trains sequence_classify tasks"
        )
    config = as_served(config, spec, out)
    if config.compose_filler and not config.compose_background:
        background = served_tier(spec, out).options.get("background_labels", ())
        config = dataclasses.replace(config, compose_background=tuple(background))
    labels = task_labels(spec, models_dir)
    eval_examples = load_labeled(eval_file, multi_label=multi_label) if eval_file else None
    test_examples = load_labeled(test_file, multi_label=multi_label) if test_file else None
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "labels": labels,
        "data": data_name,
        "eval_examples": eval_examples,
        "test_examples": test_examples,
        "test_data": test_file.name if test_file else None,
        "base": base,
        "config": config,
        "test_fraction": test_fraction,
    }
    try:
        if quiet:  # for --json: stdout carries the JSON only, stderr no bars
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            metrics = train_task(spec.name, examples, tmp, progress=lambda event: None, **kwargs)
        else:
            with training_progress(spec.name) as progress:
                metrics = train_task(spec.name, examples, tmp, progress=progress, **kwargs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if extra:
        metrics.update(extra)
    # The card and metrics name the final folder, not the temporary one.
    from fleet.models.finetune import CARD_FILE, METRICS_FILE, model_card, tier_toml

    metrics["toml"] = tier_toml(spec.name, out.name, out.resolve(), reading=config.reading())
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (tmp / CARD_FILE).write_text(model_card(metrics), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return metrics


__all__ = [
    "Chosen",
    "as_served",
    "served_reading",
    "TrainingDataError",
    "choose_examples",
    "run_training",
    "task_labels",
    "training_lines",
    "training_progress",
]
