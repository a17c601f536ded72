"""Fine-tuned encoders (BERT, DistilBERT, RoBERTa, MiniLM) for intent,
context, worthiness and sentiment: any AutoModelForSequenceClassification folder."""

from __future__ import annotations

import logging
from typing import Any

from fleet.config.taskconfig import TierSpec
from workers import calibration
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.text import conversation_text

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


class SequenceClassifyAdapter:
    kind = "sequence_classify"

    def __init__(self, *, max_chars: int = 1_000_000, top_k: int = 5) -> None:
        self.max_chars = max_chars
        self.top_k = top_k
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = 512
        self.device = "cpu"
        self.calibration: calibration.Calibration | None = None

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, local_files_only=True, dtype=torch_dtype(tier.dtype, device)
        )
        self.model = model.to(device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or tier.max_length
        self.max_length = min(tier.max_length, limit)
        self.device = device
        self.calibration = calibration.read_calibration(model_path)
        if self.calibration is None:
            log.warning("%s: %s", model_path, calibration.UNCALIBRATED)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None

    def prepare(self, source: Source) -> Prepared:
        text = conversation_text(source.data, max_chars=self.max_chars)
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length)
        ids = enc["input_ids"]
        notes = {"truncated": True} if len(ids) >= self.max_length else {}
        return Prepared(source.item_id, len(ids), ids, notes)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        import torch

        padded = self.tokenizer.pad({"input_ids": [p.payload for p in batch]}, return_tensors="pt")
        padded = {k: v.to(self.device) for k, v in padded.items()}
        with torch.inference_mode():
            logits = self.model(**padded).logits.float()
        logits = calibration.scale_logits(logits, self.calibration)
        probs = torch.softmax(logits, dim=-1).cpu()
        id2label = self.model.config.id2label
        k = min(self.top_k, probs.shape[-1])
        top = torch.topk(probs, k, dim=-1)
        out: list[Prediction | InputError] = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            scores = {
                str(id2label[i]): round(float(v), 6) for v, i in zip(values, indices, strict=True)
            }
            out.append(
                Prediction(
                    label=str(id2label[indices[0]]),
                    confidence=float(values[0]),
                    scores=scores,
                    output=calibration.calibration_output(self.calibration),
                )
            )
        return out
