"""Fine-tuned encoders (BERT, DistilBERT, RoBERTa, MiniLM) for intent,
context, worthiness and sentiment: any AutoModelForSequenceClassification folder.

A folder whose config.json has `problem_type = "multi_label_classification"` is
read as transformers trains it: a sigmoid per label, each label kept at or above
its threshold (`workers.multilabel`); every other folder through a softmax, one
label per item."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from config.taskconfig import TierSpec
from workers import calibration, multilabel
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.windowed import (
    Reading,
    Windows,
    background_indices,
    check_trained_reading,
    encode_windows,
    reading_output,
)
from workers.labelmap import check_labels, model_labels
from workers.windows import pool, pool_independent

log = logging.getLogger(__name__)


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            name
        ]
    except KeyError:
        raise ValueError(
            f"dtype must be auto, float32, float16 or bfloat16, got {name!r}"
        ) from None


# A task's `scores` keep every label's probability up to this many labels; a
# model with more keeps the most probable ones (set `top_k` on the task).
ALL_SCORES_UP_TO = 32


def scores_kept(n_labels: int, top_k: int | None) -> int:
    """How many labels' probabilities a result's `scores` keep: `top_k` when the
    task sets it, else every label up to ALL_SCORES_UP_TO labels; never more
    than the model has."""
    if top_k is not None:
        return min(top_k, n_labels)
    return min(n_labels, ALL_SCORES_UP_TO)


class SequenceClassifyAdapter:
    """Softmax over the classifier's labels. `scores` keep every label's
    probability (`scores_kept`: all up to 32 labels, or the task's `top_k`);
    when fewer than all are kept, the result's output says how many of how
    many (`{"scores_kept": k, "labels": n}`).

    A multi-label folder (`multilabel.is_multi_label`): a sigmoid per label,
    windows pooled per label (`pool_independent`), the label set kept by
    per-label thresholds (`multilabel.label_set_answer`); `scores` then hold
    every label's probability whatever `top_k` says."""

    kind = "sequence_classify"

    def __init__(
        self, *, max_chars: int = 1_000_000, top_k: int | None = None, labels: Iterable[str] = ()
    ) -> None:
        self.max_chars = max_chars
        self.top_k = top_k
        self.labels = tuple(labels)  # the task's label set; empty: any model's labels
        self.id2label: dict[int, str] = {}
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = 512
        self.reading = Reading(self.max_length)
        self.background: tuple[int, ...] = ()  # label indices `salient` pooling looks past
        self.device = "cpu"
        self.calibration: calibration.Calibration | None = None
        self.multi_label = False
        self.thresholds: dict[str, float] = {}
        self.threshold_sources: dict[str, str] = {}

    def check(self, tier: TierSpec, model_path: str) -> None:
        """Raise LabelMapError (a ValueError) unless the tier's labels, from its
        config.json or a label map shipped beside it, are the task's. Reads
        config files only."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        id2label = self._labels(tier, model_path, config.id2label)
        if multilabel.is_multi_label(config):
            self._thresholds(tier, model_path, id2label)

    def _labels(self, tier: TierSpec, model_path: str, config_id2label: Any) -> dict[int, str]:
        id2label, where = model_labels(Path(model_path), config_id2label)
        check_labels(id2label, self.labels, where=f"tier {tier.name} ({model_path}, {where})")
        return id2label

    def _thresholds(
        self, tier: TierSpec, model_path: str, id2label: dict[int, str]
    ) -> tuple[dict[str, float], dict[str, str]]:
        """A multi-label tier's thresholds (tier option, thresholds.json, 0.5), checked."""
        names = [id2label[i] for i in sorted(id2label)]
        where = f"tier {tier.name} ({model_path})"
        multilabel.check_label_names(names, where=where)
        try:
            stored = multilabel.read_thresholds(model_path, names)
            return multilabel.resolve_thresholds(names, stored, tier.options.get("thresholds"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, local_files_only=True, dtype=torch_dtype(tier.dtype, device)
        )
        self.id2label = self._labels(tier, model_path, model.config.id2label)
        self.model = model.to(device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or tier.max_length
        self.max_length = min(tier.max_length, limit)
        self.reading = Reading.from_options(self.max_length, tier.options)
        self.background = background_indices(
            [self.id2label[i] for i in sorted(self.id2label)], tier.options
        )
        saved = getattr(self.model.config, "fleet_reading", None)
        check_trained_reading(saved, self.reading, model=model_path)
        self.device = device
        self.calibration = calibration.read_calibration(model_path)
        if self.calibration is None:
            log.warning("%s: %s", model_path, calibration.UNCALIBRATED)
        self.multi_label = multilabel.is_multi_label(self.model.config)
        if self.multi_label:
            self.thresholds, self.threshold_sources = self._thresholds(
                tier, model_path, self.id2label
            )
            if "default" in self.threshold_sources.values():
                log.warning(
                    "%s: multi-label model without thresholds.json or a tier option "
                    "`thresholds`: labels without one are kept at >= %.2f",
                    model_path,
                    multilabel.DEFAULT_THRESHOLD,
                )

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None

    def prepare(self, source: Source) -> Prepared:
        """Every window of the conversation (workers.adapters.windowed); cost = its
        windows' padded tokens. Notes `unread_tokens` when `max_windows` left some out."""
        windows = encode_windows(
            self.tokenizer, source.data, self.reading, max_chars=self.max_chars
        )
        notes = {"unread_tokens": windows.plan.tokens_unread} if windows.plan.skipped else {}
        return Prepared(source.item_id, windows.cost, windows, notes)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """All windows of the sub-batch in one forward pass, pooled per item."""
        import torch

        windows: list[Windows] = [p.payload for p in batch]
        rows = self.window_probs(windows)
        if self.multi_label:
            return self._label_sets(windows, rows)
        id2label = self.id2label
        out: list[Prediction | InputError] = []
        at = 0
        for w in windows:
            pooled = pool(
                rows[at : at + len(w.ids)], w.plan, self.reading.pooling, background=self.background
            )
            at += len(w.ids)
            probs = torch.tensor(pooled.probs)
            n = probs.shape[-1]
            k = scores_kept(n, self.top_k)
            top = torch.topk(probs, k)
            values, indices = top.values.tolist(), top.indices.tolist()
            scores = {
                str(id2label[i]): round(float(v), 6) for v, i in zip(values, indices, strict=True)
            }
            out.append(
                Prediction(
                    label=str(id2label[indices[0]]),
                    confidence=float(values[0]),
                    scores=scores,
                    output={
                        "reading": reading_output(w, pooled, self.reading),
                        **({"scores_kept": k, "labels": n} if k < n else {}),
                        **(calibration.calibration_output(self.calibration) or {}),
                    },
                )
            )
        return out

    def _label_sets(
        self, windows: list[Windows], rows: list[list[float]]
    ) -> list[Prediction | InputError]:
        """Multi-label: per item, its windows' sigmoids pooled per label, then the label
        set over the thresholds (`multilabel.label_set_answer`)."""
        names = [self.id2label[i] for i in sorted(self.id2label)]
        out: list[Prediction | InputError] = []
        at = 0
        for w in windows:
            pooled = pool_independent(rows[at : at + len(w.ids)], w.plan, self.reading.pooling)
            at += len(w.ids)
            probs = {n: round(float(p), 6) for n, p in zip(names, pooled.probs, strict=True)}
            label, confidence, extra = multilabel.label_set_answer(
                probs, self.thresholds, self.threshold_sources
            )
            out.append(
                Prediction(
                    label=label,
                    confidence=confidence,
                    scores=dict(sorted(probs.items(), key=lambda kv: -kv[1])),
                    output={
                        **extra,
                        "reading": reading_output(w, pooled, self.reading),
                        **(calibration.calibration_output(self.calibration) or {}),
                    },
                )
            )
        return out

    def window_probs(self, windows: list[Windows]) -> list[list[float]]:
        """Label probabilities of every window (rows in item, then window order),
        one padded forward pass; the model folder's temperature applied
        (workers.calibration) when it has one. Softmax over the labels, or a
        sigmoid per label for a multi-label model."""
        import torch

        flat = [ids for w in windows for ids in w.ids]
        padded = self.tokenizer.pad({"input_ids": flat}, return_tensors="pt")
        padded = {k: v.to(self.device) for k, v in padded.items()}
        with torch.inference_mode():
            logits = self.model(**padded).logits.float()
        logits = calibration.scale_logits(logits, self.calibration)
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        rows: list[list[float]] = probs.cpu().tolist()
        return rows
