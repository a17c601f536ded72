"""The pieces `fleet train` hands to transformers' `Trainer`: the encoded rows, the
collator, the weighted loss and the progress callback.

Single-label rows carry a label id and the loss is cross-entropy weighted per
class and per example. Multi-label rows carry a 0/1 target per label and the
loss is binary cross-entropy per (item, label) (the head transformers trains
for `problem_type = "multi_label_classification"`), optionally with a weight
for positives per label, times the example's weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from fleet.models.labeled import MAX_TEXT_CHARS, Example
from workers.adapters.windowed import Reading, encode_windows, text_data

ProgressFn = Callable[[dict[str, Any]], None]


def targets_of(ex: Example, label2id: dict[str, int]) -> list[float]:
    """A multi-label example's 0/1 target per label, in id order."""
    row = [0.0] * len(label2id)
    for name in ex.labels or ():
        row[label2id[name]] = 1.0
    return row


def encode_rows(
    tokenizer: Any,
    examples: Sequence[Example],
    label2id: dict[str, int],
    reading: Reading,
    *,
    multi_label: bool = False,
) -> Any:
    """One training row per window of each example, windowed as the served tier reads
    (workers.adapters.windowed.encode_windows): a short example is one row, exactly
    what serving reads; a long one gives each of its windows the example's label
    (multi-label: its label set, as a 0/1 row)."""
    import torch

    rows: list[dict[str, Any]] = []
    for ex in examples:
        windows = encode_windows(tokenizer, text_data(ex.text), reading, max_chars=MAX_TEXT_CHARS)
        target: Any = targets_of(ex, label2id) if multi_label else label2id[ex.label]
        for ids in windows.ids:
            rows.append({"input_ids": ids, "labels": target, "sample_weight": ex.weight})

    class Encoded(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return rows[i]

    return Encoded()


def collator(
    tokenizer: Any, *, multi_label: bool = False
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Pads a batch's ids; labels become a long tensor (ids) or a float matrix (0/1 rows)."""
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(
            tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        )
        batch["labels"] = torch.tensor(
            [r["labels"] for r in rows], dtype=torch.float if multi_label else torch.long
        )
        batch["sample_weight"] = torch.tensor([r["sample_weight"] for r in rows], dtype=torch.float)
        return batch

    return collate


def trainer_class() -> Any:
    """transformers' Trainer with the fleet's loss (see the module docstring)."""
    import torch
    from transformers import Trainer

    class WeightedTrainer(Trainer):
        """Trainer whose loss is weighted per class (or per label's positives) and per example."""

        def __init__(
            self,
            *args: Any,
            class_weight: Any = None,
            multi_label: bool = False,
            pos_weight: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.class_weight = class_weight
            self.multi_label = multi_label
            self.pos_weight = pos_weight

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
            logits = outputs.logits.float()
            if self.multi_label:
                pos = None if self.pos_weight is None else self.pos_weight.to(logits.device)
                per_label = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, labels.float(), pos_weight=pos, reduction="none"
                )
                per_item = per_label.mean(dim=-1)
            else:
                per_item = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                if self.class_weight is not None:
                    weight = weight * self.class_weight.to(weight.device)[labels]
            loss = (per_item * weight).sum() / weight.sum().clamp_min(1e-12)
            return (loss, outputs) if return_outputs else loss

    return WeightedTrainer


def progress_callback(progress: ProgressFn) -> Any:
    """A TrainerCallback forwarding step, evaluation and epoch events to `progress`."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """Forwards step and evaluation events to `progress` (a rich bar in `fleet models prepare`)."""

        loss = float("nan")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # state.epoch is fractional: in (0, 1] during the first epoch (1.0 at its last step)
            progress(
                {
                    "stage": "train",
                    "epoch": max(1, math.ceil(state.epoch or 0)),
                    "epochs": int(args.num_train_epochs),
                    "step": state.global_step,
                    "total_steps": state.max_steps,
                    "loss": self.loss,
                }
            )

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # done / total in examples, as the other evaluations report (the loader
            # counts batches)
            loader = kw.get("eval_dataloader")
            dataset = getattr(loader, "dataset", None)
            total = len(dataset) if dataset is not None else None
            size = getattr(loader, "batch_size", None) or args.per_device_eval_batch_size
            self.eval_steps = getattr(self, "eval_steps", 0) + 1
            done = min(self.eval_steps * size, total) if total else self.eval_steps
            progress({"stage": "eval", "set": "validation", "done": done, "total": total})

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
        ) -> None:
            self.eval_steps = 0
            progress({"stage": "epoch", "epoch": round(state.epoch or 0), **(metrics or {})})

    return Forward()
