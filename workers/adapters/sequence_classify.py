"""Fine-tuned encoders (BERT, DistilBERT, RoBERTa, MiniLM) for intent,
context, worthiness and sentiment: any AutoModelForSequenceClassification folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fleet.config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.text import conversation_text
from workers.labelmap import check_labels, model_labels


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

    def __init__(
        self, *, max_chars: int = 1_000_000, top_k: int = 5, labels: Iterable[str] = ()
    ) -> None:
        self.max_chars = max_chars
        self.top_k = top_k
        self.labels = tuple(labels)  # the task's label set; empty: any model's labels
        self.id2label: dict[int, str] = {}
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = 512
        self.device = "cpu"

    def check(self, tier: TierSpec, model_path: str) -> None:
        """Raise LabelMapError (a ValueError) unless the tier's labels, from its
        config.json or a label map shipped beside it, are the task's. Reads
        config files only."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self._labels(tier, model_path, config.id2label)

    def _labels(self, tier: TierSpec, model_path: str, config_id2label: Any) -> dict[int, str]:
        id2label, where = model_labels(Path(model_path), config_id2label)
        check_labels(id2label, self.labels, where=f"tier {tier.name} ({model_path}, {where})")
        return id2label

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
        self.device = device

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
        probs = torch.softmax(logits, dim=-1).cpu()
        id2label = self.id2label
        k = min(self.top_k, probs.shape[-1])
        top = torch.topk(probs, k, dim=-1)
        out: list[Prediction | InputError] = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            scores = {
                str(id2label[i]): round(float(v), 6) for v, i in zip(values, indices, strict=True)
            }
            out.append(
                Prediction(
                    label=str(id2label[indices[0]]), confidence=float(values[0]), scores=scores
                )
            )
        return out
