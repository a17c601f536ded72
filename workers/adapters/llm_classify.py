"""Classify a conversation with a small causal LM into the JSON contract (category,
confidence, reasoning, key_entities, secondary_categories).

Two methods (task option `method`):

* "score" (default): label scoring. The prompt ends with "This conversation is
  about" and each label's phrase(s) are scored as its continuation
  (`workers.adapters.label_scoring`): the instructions' KV cache is computed once at
  load, a sub-batch is one forward over the conversations and one over the label
  tokens. The per-label log-probabilities become a distribution, calibrated by
  dividing out that of a content-free input (Zhao et al. 2021, "Calibrate Before
  Use"); `scores` is that distribution, `confidence` its maximum, secondary
  categories the other labels with at least `secondary_threshold`. Why: a 135M model
  that writes its answer mostly writes its favourite label (0.16-0.28 accuracy);
  scored and calibrated it reaches 0.635, at 26x the items/s (docs/benchmarks.md).
  `reasoning = true` generates reasoning and key_entities afterwards, the category
  already fixed (JSON prompt, started reply).
* "generate": the whole answer is generated, the reply *started* for the model
  (`{"category": "`), the category *constrained* to spell a label, generation stopped
  when the object closes, then parsed, validated and repaired at most once
  (`workers.adapters.llm_json`); an unusable answer is an explicit `invalid_output`
  error, never a default label. An answer cut by max_new_tokens is recorded as
  `truncated` and a cut value is missing with its reason, never repaired into one.

Conversation text is tokenized with special tokens split, so a message holding the
chat template's control strings (a fake end of turn and assistant turn) stays text.
Truncation works on token ids of the rendered transcript (`truncate_middle`): head and
tail kept, a marker line in place of the middle. Models with a chat template get
system/user/assistant turns; base models (Gemma 3 270M) the same text plainly.

Everything that does not need torch is a pure module-level function so it can be unit
tested without a model; torch/transformers are imported only inside `load`/`predict`.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping, Sequence
from typing import Any

from config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.label_scoring import (
    CONTENT_FREE_INPUTS,
    calibrated,
    label_distribution,
    mean_distribution,
    per_label_logprobs,
    prefix_cache_for,
    score_continuations,
)
from workers.adapters.llm_json import (
    _SOFT_FIELDS,
    CategorySpeller,
    json_object_closed,
    parse_llm_json,
    reasoning_fields,
    repair_json,
    validate_answer,
)
from workers.adapters.text import conversation_messages
from workers.windows import fit_turns

__all__ = [
    "ANSWER_PREFIX",
    "CategorySpeller",
    "LLMClassifyAdapter",
    "json_object_closed",
    "parse_llm_json",
    "reasoning_fields",
    "render_transcript",
    "repair_json",
    "truncate_middle",
    "validate_answer",
]

ANSWER_PREFIX = '{"category": "'
DEFAULT_MAX_NEW_TOKENS = 96
TRUNCATION_MARKER = "\n[... middle of the conversation omitted ...]\n"
_SENTINEL = "\u2063CONVERSATION\u2063"  # placeholder split out of the rendered template
# The user turn; "{conversation}" is replaced by the (possibly truncated) transcript.
# Asking the question *after* the conversation helps a small model (recency).
USER_TEMPLATE = (
    "Conversation:\n{conversation}\n\n"
    "Which category fits this conversation best? Answer with the JSON object."
)
# Label scoring: the answer starts with SCORING_LEAD and each label's phrases are
# scored as its continuation. Chosen on SmolLM2-135M: natural phrases score far
# better than label names in JSON (see docs/benchmarks.md).
SCORING_SYSTEM = "You classify conversations by topic."
SCORING_TEMPLATE = "Conversation:\n{conversation}\n\nWhat is this conversation about?"
SCORING_LEAD = "This conversation is about"


# --------------------------------------------------------------------------- prompt


def build_system_prompt(labels: Mapping[str, str]) -> str:
    """The instructions: categories with descriptions and the JSON keys to answer with.

    Worded after trying variants on SmolLM2-135M: angle-bracket placeholders or a
    worked example get copied verbatim (the example's label wins every time); plain
    types ("string", "number between 0 and 1") copy least and spread the labels best.
    """
    lines = "\n".join(f"{name}: {desc}" for name, desc in labels.items())
    return (
        "Classify the topic of a conversation. Possible categories:\n"
        + lines
        + '\n\nReply only with JSON: {"category": string, "confidence": number between 0 and 1, '
        '"reasoning": string, "key_entities": [string], "secondary_categories": [string]}'
    )


def render_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation as `role: content` lines (empty messages dropped)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["content"].strip())


def truncate_middle(
    token_ids: Sequence[int], max_len: int, marker: Sequence[int] = ()
) -> tuple[list[int], int]:
    """Fit `token_ids` into `max_len` by dropping tokens from the middle.

    Why the middle: a conversation's opening states the topic and its end the latest
    turn; both matter more for intent than the middle. The head gets the extra token
    when the room is odd. `marker` (e.g. the ids of "[... omitted ...]") is put where
    the cut is and counts towards `max_len`. Returns (ids, number of tokens dropped).
    """
    ids = list(token_ids)
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    if len(ids) <= max_len:
        return ids, 0
    marker = list(marker) if len(marker) < max_len else []
    room = max_len - len(marker)
    head = (room + 1) // 2
    tail = room - head
    kept = ids[:head] + marker + (ids[len(ids) - tail :] if tail else [])
    return kept, len(ids) - head - tail


def load_examples(path: str | None, labels: Mapping[str, str], k: int) -> list[tuple[str, str]]:
    """k few-shot examples as (transcript, label) from a labeled JSONL file.

    Rows hold "label" and either "messages" (a conversation) or "text". A relative
    path is looked up under the package's config/data folder first. The choice is fixed
    and balanced: the first unused example of each label in turn (label order), so
    every label is shown before any is shown twice. Raises ValueError for a missing
    file, a row that is not JSON, or a label that is not configured.
    """
    if not path or k <= 0:
        return []
    from pathlib import Path

    from config.data import data_path

    file = Path(path)
    if not file.is_absolute() and not file.is_file():
        file = data_path(path)
    if not file.is_file():
        raise ValueError(
            f"few-shot examples file {path!r} not found (absolute, or under config/data)"
        )
    by_label: dict[str, list[str]] = {name: [] for name in labels}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{file}:{n}: not JSON ({exc})") from exc
        label = row.get("label")
        if label not in by_label:
            raise ValueError(f"{file}:{n}: label {label!r} is not one of {sorted(by_label)}")
        messages = row.get("messages") or [{"role": "user", "content": str(row.get("text", ""))}]
        by_label[label].append(render_transcript(messages))
    chosen: list[tuple[str, str]] = []
    while len(chosen) < k and any(by_label.values()):
        for name, texts in by_label.items():
            if texts and len(chosen) < k:
                chosen.append((texts.pop(0), name))
    return chosen


def prompt_frame(
    tokenizer: Any, system: str, user_template: str, shots: Sequence[tuple[str, str]]
) -> tuple[str, str]:
    """The prompt text (before, after) the conversation.

    `shots` are (transcript, answer text) pairs shown first. With a chat template:
    system turn, each shot as a user turn and an assistant turn, then the user turn;
    `after` ends with the assistant turn opened. Without one (a base model such as
    Gemma 3 270M): the same content as plain text, each answer after "Answer: ".
    The start of the answer (lead) is not included. Raises ValueError when the chat
    template drops the user message.
    """
    if tokenizer.chat_template is not None:
        turns: list[dict[str, str]] = [{"role": "system", "content": system}]
        for transcript, answer in shots:
            turns.append({"role": "user", "content": user_template.format(conversation=transcript)})
            turns.append({"role": "assistant", "content": answer})
        turns.append(
            {"role": "user", "content": user_template.replace("{conversation}", _SENTINEL)}
        )
        rendered = str(
            tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        )
    else:
        parts = [system, ""]
        for transcript, answer in shots:
            parts.append(user_template.format(conversation=transcript))
            parts.append(f"Answer: {answer}\n")
        parts.append(user_template.replace("{conversation}", _SENTINEL))
        rendered = "\n".join(parts) + "\nAnswer: "
    before, found, after = rendered.partition(_SENTINEL)
    if not found:
        raise ValueError("the chat template dropped the user message")
    return before, after


def load_verbalizers(path: str | None, labels: Mapping[str, str]) -> dict[str, list[str]]:
    """The phrases scored for each label ("This conversation is about <phrase>").

    Without a file: the label's description from the task config. A file (JSON, a
    relative path is under config/data) maps label -> {"verbalizers": [phrases]} (or,
    without that key, its "descriptions"); every label needs at least one. Short
    phrases ("work", "small talk") cost one or two scored tokens each and scored
    better than whole descriptions on SmolLM2-135M (docs/benchmarks.md). Raises
    ValueError for a missing file or label.
    """
    if not path:
        return {name: [desc or name.replace("_", " ")] for name, desc in labels.items()}
    data = json.loads(data_file(path, "verbalizers").read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    for name in labels:
        entry = data.get(name) or {}
        phrases = entry.get("verbalizers") or entry.get("descriptions") or []
        if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise ValueError(f"{path}: label {name!r} needs a non-empty list of descriptions")
        out[name] = [p.strip() for p in phrases]
    return out


def data_file(path: str, what: str) -> Any:
    """An absolute path, or one under the package's config/data folder."""
    from pathlib import Path

    from config.data import data_path

    file = Path(path)
    if not file.is_absolute() and not file.is_file():
        file = data_path(path)
    if not file.is_file():
        raise ValueError(f"{what} file {path!r} not found (absolute, or under config/data)")
    return file


def _continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as it is tokenized after `context` (falls back to
    tokenizing it alone when the two merge across the boundary)."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return list(full[len(base) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- adapter


class LLMClassifyAdapter:
    """Adapter for kind "llm_classify": labels (name -> one-line description) in, the
    JSON contract out (category, confidence, reasoning, key_entities,
    secondary_categories).

    Methods (task option `method`):
      * "score" (default): every label's sequence log-probability as the continuation
        of `{"category": "`, calibrated (Zhao et al. 2021) into a distribution; see
        `workers.adapters.label_scoring`. `reasoning = true` then generates reasoning
        and key_entities after the category is fixed.
      * "generate": greedy generation of the whole answer with the category spelling
        constrained (the earlier behaviour, kept for comparison and for models whose
        log-probabilities are not to be trusted).

    Other options: `calibrate` (default true), `examples` (a labeled JSONL file: rows of
    {"messages" or "text", "label"}; relative paths are under config/data) with `shots`
    (k examples in the prompt, one per label in turn, file order), `secondary_threshold`
    (labels other than the best with at least this probability are listed as
    secondary_categories, default 0.15).
    """

    kind = "llm_classify"

    def __init__(
        self,
        *,
        labels: dict[str, str],
        max_chars: int = 1_000_000,
        method: str = "score",
        calibrate: bool = True,
        reasoning: bool = False,
        examples: str | None = None,
        shots: int = 0,
        verbalizers: str | None = None,
        secondary_threshold: float = 0.15,
        prompt: str = "transcript",
        assistant_tokens: int = 32,
        prompt_tokens: int | None = None,
        **_: Any,
    ) -> None:
        if not labels:
            raise ValueError("llm_classify needs at least one label")
        bad = [name for name in labels if not name or '"' in name or "\\" in name]
        if bad:
            raise ValueError(f"labels may not be empty or contain quotes/backslashes: {bad}")
        if method not in ("score", "generate"):
            raise ValueError(f"llm_classify method must be 'score' or 'generate', got {method!r}")
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        if prompt not in ("transcript", "user_turns"):
            raise ValueError(f"prompt must be 'transcript' or 'user_turns', got {prompt!r}")
        self.labels = dict(labels)
        self.names = list(self.labels)
        self.max_chars = max_chars
        self.method = method
        self.calibrate = bool(calibrate)
        self.reasoning = bool(reasoning)
        self.examples_path = examples
        self.shots = int(shots) if examples else 0
        self.verbalizers_path = verbalizers
        self.secondary_threshold = float(secondary_threshold)
        self.system_prompt = build_system_prompt(self.labels)
        # prompt "user_turns": the conversation fitted around the user's turns
        # (workers.windows.fit_turns): assistant turns cut to `assistant_tokens`,
        # at most `prompt_tokens` tokens (default: all the room), latest user turns kept first.
        self.prompt = prompt
        self.assistant_tokens = int(assistant_tokens)
        self.prompt_tokens = prompt_tokens
        self._model: Any = None
        self._tokenizer: Any = None
        self._tier: TierSpec | None = None
        self._device = "cpu"
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        self._marker_ids: list[int] = []
        self._label_ids: list[list[int]] = []
        self._owners: list[int] = []
        self._json_prefix: list[int] = []
        self._json_after = ""
        self._room = 0
        self._prefix_cache: Any = None
        self._token_strings: list[str] = []
        self._speller: CategorySpeller | None = None
        self._prior: list[float] | None = None
        self._eos_id: int = 0
        self._pad_id: int = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def max_new_tokens(self) -> int:
        tier = self._tier
        return (
            int(tier.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            if tier
            else DEFAULT_MAX_NEW_TOKENS
        )

    @property
    def prior(self) -> dict[str, float] | None:
        """The content-free label distribution divided out by calibration (None when off)."""
        return None if self._prior is None else dict(zip(self.names, self._prior, strict=True))

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load a prepared local folder (never the hub) and precompute prompt pieces.

        A tokenizer with a chat template gets the system/user/assistant turns; one
        without (a base model such as Gemma 3 270M) gets the same text as a plain
        prompt. Configuration problems (tier too short for the instructions, a label the
        vocabulary cannot spell, an unreadable examples file) are raised before the
        weights are loaded. With calibration on, the content-free prior is scored here.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.unload()
        dtype = _resolve_dtype(tier.dtype, str(device).startswith("cuda"))
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        tokenizer.padding_side = "left"
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
            eos_id = tokenizer.eos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_id)

        shots = load_examples(self.examples_path, self.labels, self.shots)
        special = tokenizer.chat_template is None  # a plain prompt starts with BOS itself

        def ids(text: str, first: bool = False) -> list[int]:
            return list(tokenizer(text, add_special_tokens=first and special)["input_ids"])

        # The JSON frame: generation (method "generate") and reasoning after scoring.
        before, after = prompt_frame(
            tokenizer,
            self.system_prompt,
            USER_TEMPLATE,
            [(t, f'{{"category": "{lab}"}}') for t, lab in shots],
        )
        json_prefix, json_after = ids(before, True), after
        prefix_ids, suffix_ids = json_prefix, ids(after + ANSWER_PREFIX)
        label_ids: list[list[int]] = []
        owners: list[int] = []
        if self.method == "score":
            phrases = load_verbalizers(self.verbalizers_path, self.labels)
            before, after = prompt_frame(
                tokenizer,
                SCORING_SYSTEM,
                SCORING_TEMPLATE,
                [(t, f"{SCORING_LEAD} {phrases[lab][0]}.") for t, lab in shots],
            )
            prefix_ids, suffix_ids = ids(before, True), ids(after + SCORING_LEAD)
            for k, name in enumerate(self.names):
                for phrase in phrases[name]:
                    label_ids.append(
                        _continuation_ids(tokenizer, after + SCORING_LEAD, " " + phrase)
                    )
                    owners.append(k)
        marker_ids = ids(TRUNCATION_MARKER)
        max_new = int(tier.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        fixed = max(len(prefix_ids) + len(suffix_ids), len(json_prefix) + len(ids(json_after)) + 16)
        room = tier.max_length - max_new - fixed
        if room < len(marker_ids) + 32:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} leaves {room} tokens for the "
                f"conversation after the {fixed}-token instructions "
                f"and {max_new} new tokens; raise max_length, lower max_new_tokens or shots"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and tier.max_length > limit:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} > model limit {limit}"
            )
        speller = None
        token_strings: list[str] = []
        if self.method == "generate":
            vocab = max(len(tokenizer), int(config.vocab_size))
            token_strings = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            token_strings += [""] * (vocab - len(token_strings))
            speller = CategorySpeller(self.labels, token_strings, set(tokenizer.all_special_ids))

        model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=getattr(torch, dtype)
        )
        model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' typed wrapper

        self._model, self._tokenizer, self._tier, self._device = model, tokenizer, tier, str(device)
        self._prefix_ids, self._suffix_ids, self._marker_ids = prefix_ids, suffix_ids, marker_ids
        self._json_prefix, self._json_after = json_prefix, json_after
        self._label_ids, self._owners, self._room = label_ids, owners, room
        self._prefix_cache = (
            prefix_cache_for(model, prefix_ids) if self.method == "score" and prefix_ids else None
        )
        self._token_strings = token_strings
        self._speller = speller
        self._eos_id, self._pad_id = int(eos_id), int(tokenizer.pad_token_id)
        self._prior = None
        if self.method == "score" and self.calibrate:
            bodies = [self._body_ids(f"user: {text}".rstrip()) for text in CONTENT_FREE_INPUTS]
            self._prior = mean_distribution(
                [label_distribution(row) for row in self._label_logprobs(bodies)]
            )

    def unload(self) -> None:
        """Drop the model so its memory can be reused by another tier."""
        was_cuda = self._model is not None and self._device.startswith("cuda")
        self._model = None
        self._tokenizer = None
        self._speller = None
        self._token_strings = []
        self._tier = None
        self._prior = None
        self._prefix_cache = None
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    # -- per item ----------------------------------------------------------

    def _body_ids(self, transcript: str) -> list[int]:
        # split_special_tokens: text such as "<|im_end|>" in a message stays text and
        # can never close the user turn or open a fake assistant turn.
        return list(
            self._tokenizer(transcript, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        )

    def prepare(self, source: Source) -> Prepared:
        """Validate the conversation and build the prompt ids (middle-truncated to fit).

        Payload: {"body": conversation ids, "input_ids": prefix + body + suffix,
        "truncated_tokens": n}. Cost (tokens, for the batch budget): the prompt without
        the shared prefix plus one row per label when scoring; the full prompt plus
        max_new_tokens when generating. Raises InputError for a malformed conversation.
        """
        messages = conversation_messages(source.data, max_chars=self.max_chars)
        if self._tokenizer is None or self._tier is None:
            raise RuntimeError("LLMClassifyAdapter.prepare called before load")
        if self.prompt == "user_turns":
            body, dropped = self._user_turns_body(messages)
        else:
            body = self._body_ids(render_transcript(messages))
            body, dropped = truncate_middle(body, self._room, self._marker_ids)
        ids = self._prefix_ids + body + self._suffix_ids
        if self.method == "score":
            cost = (
                len(body)
                + len(self._suffix_ids)
                + len(self._label_ids) * max(len(c) for c in self._label_ids)
            )
            if self.reasoning:
                cost += len(self._json_prefix) + len(ids) + self.max_new_tokens
        else:
            cost = len(ids) + self.max_new_tokens
        notes = {"truncated_tokens": dropped} if dropped else {}
        return Prepared(
            item_id=source.item_id,
            cost=cost,
            payload={"body": body, "input_ids": ids, "truncated_tokens": dropped},
            notes=notes,
        )

    def _user_turns_body(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], int]:
        """The transcript fitted around the user's turns (workers.windows.fit_turns):
        (ids of the kept `role: content` lines joined by newlines, tokens left out)."""
        lines = [m for m in messages if m["content"].strip()]
        ids = [self._body_ids(f"{m['role']}: {m['content']}") for m in lines]
        newline = self._body_ids("\n")
        room = min(self._room, self.prompt_tokens or self._room) - len(newline) * len(lines)
        segments, dropped = fit_turns(
            [(m["role"], len(i)) for m, i in zip(lines, ids, strict=True)],
            max(room, 1),
            assistant_cap=self.assistant_tokens,
        )
        body: list[int] = []
        for k, seg in enumerate(segments):
            body += (newline if k else []) + ids[seg.turn][seg.start : seg.end]
        return body, dropped

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """Score the labels (or generate, with method "generate") for one sub-batch."""
        if not batch:
            return []
        if self._model is None:
            raise RuntimeError("LLMClassifyAdapter.predict called before load")
        if self.method == "generate":
            results = self._generate(
                [p.payload["input_ids"] for p in batch], [ANSWER_PREFIX] * len(batch), True
            )
            return [
                self._to_prediction(raw, p.payload.get("truncated_tokens", 0), cut)
                for (raw, cut), p in zip(results, batch, strict=True)
            ]
        rows = self._label_logprobs([p.payload["body"] for p in batch])
        preds = [
            self._scored_prediction(row, p.payload.get("truncated_tokens", 0))
            for row, p in zip(rows, batch, strict=True)
        ]
        if self.reasoning:
            preds = self._add_reasoning(batch, preds)
        return list(preds)

    def label_distribution(self, logprobs: Sequence[float]) -> tuple[list[float], list[float]]:
        """(calibrated, raw) label distributions from one row of label log-probabilities."""
        raw = label_distribution(logprobs)
        return (calibrated(raw, self._prior) if self._prior is not None else raw), raw

    def _label_logprobs(self, bodies: Sequence[Sequence[int]]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            scores = score_continuations(
                self._model,
                [list(b) + self._suffix_ids for b in bodies],
                self._label_ids,
                shared_prefix=self._prefix_ids,
                prefix_cache=self._prefix_cache,
                pad_id=self._pad_id,
            )
        return [per_label_logprobs(row, self._owners, len(self.names)) for row in scores.tolist()]

    def _scored_prediction(self, logprobs: Sequence[float], truncated: int) -> Prediction:
        probs, raw = self.label_distribution(logprobs)
        scores = {n: round(p, 6) for n, p in zip(self.names, probs, strict=True)}
        ranked = sorted(self.names, key=lambda n: -scores[n])
        best = ranked[0]
        secondary = [n for n in ranked[1:] if scores[n] >= self.secondary_threshold]
        output = {
            "status": "ok",
            "method": "label_scoring",
            "calibrated": self._prior is not None,
            "category": best,
            "confidence": scores[best],
            "reasoning": "",
            "key_entities": [],
            "secondary_categories": secondary,
            "uncalibrated": {n: round(p, 6) for n, p in zip(self.names, raw, strict=True)},
            "field_errors": {},
            "truncated_tokens": truncated,
        }
        return Prediction(label=best, confidence=scores[best], scores=scores, output=output)

    def _add_reasoning(self, batch: list[Prepared], preds: list[Prediction]) -> list[Prediction]:
        """Generate reasoning and key_entities for the fixed categories, one batch."""
        forced = [f'{{"category": "{p.label}", "reasoning": "' for p in preds]
        prompts = [
            self._json_prefix
            + list(p.payload["body"])
            + self._tokenizer(self._json_after + f, add_special_tokens=False)["input_ids"]
            for p, f in zip(batch, forced, strict=True)
        ]
        results = self._generate(prompts, forced, False)
        out: list[Prediction] = []
        for pred, (raw, cut) in zip(preds, results, strict=True):
            assert pred.output is not None
            output = dict(pred.output)
            extra = reasoning_fields(raw, cut, self.max_new_tokens)
            output.update(extra)
            output["raw"] = raw
            out.append(
                Prediction(
                    label=pred.label, confidence=pred.confidence, scores=pred.scores, output=output
                )
            )
        return out

    def _generate(
        self, prompts: list[list[int]], forced: list[str], constrained: bool
    ) -> list[tuple[str, bool]]:
        """Greedy generation on one left-padded sub-batch.

        Returns (forced prefix + generated text, cut) per row; `cut` is True when the row
        used all max_new_tokens without closing its JSON object (a truncated answer).
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        input_ids = input_ids.to(self._device)
        attention = attention.to(self._device)
        token_strings = self._token_strings or self._tokenizer.batch_decode(
            [[i] for i in range(len(self._tokenizer))]
        )
        self._token_strings = token_strings
        processor, stopper = _generation_hooks(
            self._speller if constrained else None, token_strings, width, forced
        )
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([processor] if processor else []),
                stopping_criteria=StoppingCriteriaList([stopper]),
                eos_token_id=self._eos_id,
                pad_token_id=self._pad_id,
            )
        results = []
        for row, new in enumerate(out[:, width:].tolist()):
            stop = [i for i, t in enumerate(new) if t in (self._eos_id, self._pad_id)]
            kept = new[: stop[0]] if stop else new
            text = forced[row] + self._tokenizer.decode(kept, skip_special_tokens=True)
            cut = len(kept) >= self.max_new_tokens and not json_object_closed(text)
            results.append((text, cut))
        return results

    def _to_prediction(self, raw: str, truncated: int, cut: bool = False) -> Prediction:
        answer, error, repaired = parse_llm_json(raw, self.labels)
        limit = f"cut off at the token limit (max_new_tokens={self.max_new_tokens})"
        if answer is None:
            why = error or "unknown"
            if cut:
                why = f"{why}; the answer was {limit}"
            return Prediction(
                label=None,
                confidence=None,
                output={
                    "status": "invalid_output",
                    "raw": raw,
                    "error": why,
                    "truncated": cut,
                    "truncated_tokens": truncated,
                },
                error=f"LLM output was not valid JSON after one repair: {why}",
            )
        if cut:
            for name in _SOFT_FIELDS:
                if answer["field_errors"].get(name) == "missing" or (
                    name == "confidence" and answer["confidence"] is None
                ):
                    answer["field_errors"][name] = f"missing: the answer was {limit}"
        scores: dict[str, float] | None = (
            {answer["category"]: answer["confidence"]} if answer["confidence"] is not None else None
        )
        output = {
            "status": "ok",
            "method": "generate",
            **answer,
            "raw": raw,
            "repaired": repaired,
            "truncated": cut,
            "truncated_tokens": truncated,
        }
        return Prediction(
            label=answer["category"], confidence=answer["confidence"], scores=scores, output=output
        )


# --------------------------------------------------------------------------- torch glue


def _resolve_dtype(dtype: str, on_cuda: bool) -> str:
    if dtype == "auto":
        return "bfloat16" if on_cuda else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r} (auto, float32, float16, bfloat16)")
    return dtype


def _generation_hooks(
    speller: CategorySpeller | None,
    token_strings: Sequence[str],
    prompt_len: int,
    forced: Sequence[str],
) -> tuple[Any, Any]:
    """A LogitsProcessor that enforces the category spelling (None without a speller)
    and a StoppingCriteria that ends a row once its JSON object (forced prefix + new
    text) is closed. Built per call (they hold row state)."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    def generated_text(row: Sequence[int]) -> str:
        return "".join(token_strings[i] if i < len(token_strings) else "" for i in row)

    class _CategoryProcessor(LogitsProcessor):
        def __init__(self, spell: CategorySpeller) -> None:
            self.spell = spell
            self.done: set[int] = set()

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
            new = input_ids[:, prompt_len:].tolist()
            masked = None
            for row, ids in enumerate(new):
                if row in self.done:
                    continue
                allowed = self.spell.allowed(generated_text(ids))
                if allowed is None:
                    self.done.add(row)
                    continue
                if masked is None:
                    masked = scores.clone()
                keep = torch.tensor(allowed, dtype=torch.long, device=scores.device)
                row_scores = torch.full_like(scores[row], float("-inf"))
                row_scores[keep] = scores[row, keep]
                masked[row] = row_scores
            return scores if masked is None else masked

    class _JsonClosed(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, prompt_len:].tolist()
            flags = [
                json_object_closed(forced[row] + generated_text(ids)) for row, ids in enumerate(new)
            ]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return (_CategoryProcessor(speller) if speller is not None else None), _JsonClosed()
