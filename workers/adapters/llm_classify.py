"""Classify a conversation with a small instruction-tuned causal LM that answers in JSON.

Why it looks like this: a 135M model (SmolLM2) does not reliably write JSON on its own.
So the reply is *started* for it (the assistant turn already holds `{"category": "`),
the category value is *constrained* to spell one of the labels followed by its closing
quote, generation stops as soon as the top-level object closes, and the answer is
parsed, validated (pydantic) and repaired at most once. An answer that is still unusable
becomes an explicit `invalid_output` error, never a default label.

Everything that does not need torch (prompt text, middle truncation, JSON parsing,
validation and repair, the label-spelling constraint) is a pure module-level function
or class so it can be unit tested without a model. torch/transformers are imported
only inside `load`/`predict` and the generation helpers.

Field policy of the answer (see `validate_answer`):
  * category: required and exactly one of the labels, else the item fails.
  * confidence: a number (or numeric string) in [0, 1]; anything else (missing, "high",
    85, -1, NaN) keeps the category but sets confidence None and records why under
    `field_errors` -- the label is trustworthy (constrained), the model's number is not.
  * reasoning: string (missing -> ""); key_entities: list of strings (missing -> []);
    secondary_categories: known labels only, main category and duplicates removed.
    Invalid values of these become their empty default, recorded in `field_errors`.

Prediction: label = category, confidence as above, scores = {category: confidence} when
the confidence is usable (else None). Secondary categories come with no number from the
model, so they are listed in output["secondary_categories"] instead of being given an
invented score. output also holds raw (forced prefix + generated text), repaired (the
one repair pass was needed), truncated_tokens and field_errors.

Truncation works on token ids of the rendered transcript (`truncate_middle`): the head
and tail are kept and a marker line replaces the middle, so the prompt is exactly
max_length - max_new_tokens tokens when it had to be cut.
"""

from __future__ import annotations

import bisect
import gc
import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.adapters.base import InputError, Prediction, Prepared, Source, TierSpec
from workers.adapters.text import conversation_messages

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
_SOFT_FIELDS = ("confidence", "reasoning", "key_entities", "secondary_categories")


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


# --------------------------------------------------------------------------- JSON


def _scan_states(text: str) -> list[tuple[bool, str]]:
    """For each cut position i (0..len), whether text[:i] ends inside a string and the
    stack of open brackets at that point."""
    states: list[tuple[bool, str]] = [(False, "")]
    in_string = escaped = False
    stack: list[str] = []
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]" and stack:
            stack.pop()
        states.append((in_string, "".join(stack)))
    return states


def json_object_closed(text: str) -> bool:
    """True once the first top-level JSON object in `text` has been closed (used to
    stop generation early; strings and escapes are respected)."""
    start = text.find("{")
    if start < 0:
        return False
    for in_string, stack in _scan_states(text[start:])[1:]:
        if not in_string and not stack:
            return True
    return False


def repair_json(text: str) -> str | None:
    """One repair pass: the longest prefix of the first object that parses once
    unterminated strings are closed, trailing commas dropped and open brackets closed.

    This covers trailing text after the object, a reply cut off by the token limit and
    a dangling key; it never invents values. None when nothing parses.
    """
    start = text.find("{")
    if start < 0:
        return None
    body = text[start:]
    states = _scan_states(body)
    for cut in range(len(body), 0, -1):
        in_string, stack = states[cut]
        candidate = body[:cut]
        if in_string:
            if candidate.endswith("\\") and not candidate.endswith("\\\\"):
                continue
            candidate += '"'
        candidate = candidate.rstrip().rstrip(",").rstrip()
        closers = "".join("}" if b == "{" else "]" for b in reversed(stack))
        try:
            json.loads(candidate + closers)
        except ValueError:
            continue
        return candidate + closers
    return None


class LLMAnswer(BaseModel):
    """Schema of the model's answer. `category` must be one of the labels passed as
    validation context; the other fields are checked but forgiven (see module doc)."""

    model_config = ConfigDict(extra="ignore")

    category: str
    confidence: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    reasoning: str = ""
    key_entities: list[str] = Field(default_factory=list)
    secondary_categories: list[str] = Field(default_factory=list)

    @field_validator("category")
    @classmethod
    def _known_category(cls, v: str, info: Any) -> str:
        labels = (info.context or {}).get("labels", ())
        if v not in labels:
            raise ValueError(f"{v!r} is not one of the labels {sorted(labels)}")
        return v

    @field_validator("confidence", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("confidence is a boolean, not a number")
        return v

    @field_validator("reasoning", mode="before")
    @classmethod
    def _null_reasoning(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("key_entities", "secondary_categories", mode="before")
    @classmethod
    def _null_list(cls, v: Any) -> Any:
        return [] if v is None else v


def validate_answer(obj: Any, labels: Collection[str]) -> tuple[dict[str, Any] | None, str | None]:
    """Check a parsed answer against `LLMAnswer`; returns (answer, None) or (None, why).

    The answer dict has the five fields plus `field_errors` ({field: why} for soft
    fields that were reset to their empty value).
    """
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    data = dict(obj)
    field_errors: dict[str, str] = {}
    labels = set(labels)
    for _ in range(len(_SOFT_FIELDS) + 1):
        try:
            answer = LLMAnswer.model_validate(data, context={"labels": labels})
            break
        except ValidationError as exc:
            hard = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                if name in _SOFT_FIELDS and name in data:
                    field_errors[name] = f"{err['msg']} (got {data.pop(name)!r})"
                else:
                    hard.append(f"{name or 'answer'}: {err['msg']}")
            if hard:
                return None, "; ".join(hard)
    else:  # pragma: no cover - each round removes at least one soft field
        return None, "answer did not validate"
    secondary: list[str] = []
    unknown: list[str] = []
    for name in answer.secondary_categories:
        if name not in labels:
            unknown.append(name)
        elif name != answer.category and name not in secondary:
            secondary.append(name)
    if unknown:
        field_errors["secondary_categories"] = f"not labels, dropped: {unknown}"
    confidence = answer.confidence
    if "confidence" not in field_errors and confidence is None:
        field_errors["confidence"] = "missing"
    if confidence is not None and not math.isfinite(confidence):  # pragma: no cover
        confidence = None
    return {
        "category": answer.category,
        "confidence": confidence,
        "reasoning": answer.reasoning,
        "key_entities": answer.key_entities,
        "secondary_categories": secondary,
        "field_errors": field_errors,
    }, None


def parse_llm_json(
    raw: str, labels: Collection[str]
) -> tuple[dict[str, Any] | None, str | None, bool]:
    """Parse and validate the model's reply (forced prefix included).

    Strict `json.loads` first; when that fails, exactly one `repair_json` pass, then
    validation. Returns (answer, error, repaired): answer is None iff error is set.
    """
    text = raw.strip()
    repaired = False
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        fixed = repair_json(text)
        if fixed is None:
            return None, f"not JSON ({exc.msg} at char {exc.pos}) and no parseable prefix", False
        obj = json.loads(fixed)
        repaired = True
    answer, error = validate_answer(obj, labels)
    if answer is None:
        return None, error, repaired
    return answer, None, repaired


# --------------------------------------------------------------------------- constraint


class CategorySpeller:
    """Which tokens may come next while the category value is being written.

    Works on token *strings* (pure Python; the torch wrapper is `_CategoryProcessor`):
    a token is allowed when, appended to what was generated so far, it stays a prefix of
    some `label + '"'` or completes one (possibly running on, e.g. `",`). Once a closing
    quote after a full label has been produced the constraint is off (`allowed` -> None).
    """

    def __init__(
        self, labels: Collection[str], token_strings: Sequence[str], skip_ids: Collection[int] = ()
    ) -> None:
        self.targets = [f'{label}"' for label in labels]
        skip = set(skip_ids)
        self.by_string: dict[str, list[int]] = {}
        for i, s in enumerate(token_strings):
            if s and i not in skip and "\ufffd" not in s:
                self.by_string.setdefault(s, []).append(i)
        self.sorted_strings = sorted(self.by_string)
        self._cache: dict[str, list[int] | None] = {}
        for target in self.targets:
            if not self._spellable(target):
                raise ValueError(f"label {target[:-1]!r} cannot be spelled with this vocabulary")

    def allowed(self, generated: str) -> list[int] | None:
        """Token ids allowed after `generated`; None = category done (no constraint)."""
        if generated in self._cache:
            return self._cache[generated]
        result: list[int] | None
        if any(generated.startswith(t) for t in self.targets):
            result = None
        else:
            ids: set[int] = set()
            for target in self.targets:
                if target.startswith(generated):
                    ids.update(self._continuations(target[len(generated) :]))
            result = sorted(ids) if ids else None  # None here: off-track, let validation judge
        self._cache[generated] = result
        return result

    def _continuations(self, rest: str) -> set[int]:
        ids: set[int] = set()
        for j in range(1, len(rest) + 1):  # tokens that are a prefix of what is left
            ids.update(self.by_string.get(rest[:j], ()))
        for s in self._prefixed(rest):  # tokens that finish it and run on (e.g. '",')
            ids.update(self.by_string[s])
        return ids

    def _spellable(self, target: str) -> bool:
        """Whether some token sequence spells `target` (checked once per label)."""
        reach = [False] * (len(target) + 1)
        reach[0] = True
        for k in range(len(target)):
            if not reach[k]:
                continue
            rest = target[k:]
            if self._prefixed(rest):  # one token finishes it
                return True
            for j in range(1, len(rest) + 1):
                if rest[:j] in self.by_string:
                    reach[k + j] = True
        return reach[len(target)]

    def _prefixed(self, rest: str) -> list[str]:
        """Token strings that start with `rest`."""
        lo = bisect.bisect_left(self.sorted_strings, rest)
        hi = bisect.bisect_left(self.sorted_strings, rest + "\U0010ffff")
        return self.sorted_strings[lo:hi]


# --------------------------------------------------------------------------- adapter


class LLMClassifyAdapter:
    """Adapter for kind "llm_classify": labels (name -> one-line description) in,
    a validated JSON answer out. See the module docstring for the field policy."""

    kind = "llm_classify"

    def __init__(self, *, labels: dict[str, str], max_chars: int = 1_000_000) -> None:
        if not labels:
            raise ValueError("llm_classify needs at least one label")
        bad = [name for name in labels if not name or '"' in name or "\\" in name]
        if bad:
            raise ValueError(f"labels may not be empty or contain quotes/backslashes: {bad}")
        self.labels = dict(labels)
        self.max_chars = max_chars
        self.system_prompt = build_system_prompt(self.labels)
        self._model: Any = None
        self._tokenizer: Any = None
        self._tier: TierSpec | None = None
        self._device = "cpu"
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        self._marker_ids: list[int] = []
        self._token_strings: list[str] = []
        self._speller: CategorySpeller | None = None
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

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load a prepared local folder (never the hub) and precompute prompt pieces.

        Configuration problems (tier too short for the instructions, a label the
        vocabulary cannot spell) are raised before the weights are loaded.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.unload()
        dtype = _resolve_dtype(tier.dtype, str(device).startswith("cuda"))
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if tokenizer.chat_template is None:
            raise ValueError(f"{model_path}: tokenizer has no chat template")
        tokenizer.padding_side = "left"
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
            eos_id = tokenizer.eos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_id)

        # The fixed prompt around the conversation, tokenized once.
        rendered = str(
            tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": USER_TEMPLATE.replace("{conversation}", _SENTINEL)},
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
        )
        before, found, after = rendered.partition(_SENTINEL)
        if not found:
            raise ValueError(f"{model_path}: chat template dropped the user message")
        prefix_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
        suffix_ids = tokenizer(after + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        marker_ids = tokenizer(TRUNCATION_MARKER, add_special_tokens=False)["input_ids"]
        max_new = int(tier.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        room = tier.max_length - max_new - len(prefix_ids) - len(suffix_ids)
        if room < len(marker_ids) + 32:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} leaves {room} tokens for the "
                f"conversation after the {len(prefix_ids) + len(suffix_ids)}-token instructions "
                f"and {max_new} new tokens; raise max_length or lower max_new_tokens"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and tier.max_length > limit:
            raise ValueError(
                f"tier {tier.name}: max_length {tier.max_length} > model limit {limit}"
            )
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
        self._token_strings = token_strings
        self._speller = speller
        self._eos_id, self._pad_id = int(eos_id), int(tokenizer.pad_token_id)

    def unload(self) -> None:
        """Drop the model so its memory can be reused by another tier."""
        was_cuda = self._model is not None and self._device.startswith("cuda")
        self._model = None
        self._tokenizer = None
        self._speller = None
        self._token_strings = []
        self._tier = None
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    # -- per item ----------------------------------------------------------

    def prepare(self, source: Source) -> Prepared:
        """Validate the conversation and build the prompt ids (middle-truncated to fit)."""
        messages = conversation_messages(source.data, max_chars=self.max_chars)
        if self._tokenizer is None or self._tier is None:
            raise RuntimeError("LLMClassifyAdapter.prepare called before load")
        transcript = render_transcript(messages)
        # split_special_tokens: a message containing "<|im_end|>" must stay text.
        body = self._tokenizer(transcript, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
        room = (
            self._tier.max_length
            - self.max_new_tokens
            - len(self._prefix_ids)
            - len(self._suffix_ids)
        )
        body, dropped = truncate_middle(body, room, self._marker_ids)
        ids = self._prefix_ids + body + self._suffix_ids
        notes = {"truncated_tokens": dropped} if dropped else {}
        return Prepared(
            item_id=source.item_id,
            cost=len(ids) + self.max_new_tokens,
            payload={"input_ids": ids, "truncated_tokens": dropped},
            notes=notes,
        )

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """Greedy, left-padded batched generation with the category constrained."""
        if not batch:
            return []
        if self._model is None:
            raise RuntimeError("LLMClassifyAdapter.predict called before load")
        raws = self._generate([p.payload["input_ids"] for p in batch])
        return [
            self._to_prediction(raw, p.payload.get("truncated_tokens", 0))
            for raw, p in zip(raws, batch, strict=True)
        ]

    def _generate(self, prompts: list[list[int]]) -> list[str]:
        """Run generate on one left-padded sub-batch; returns prefix + generated text."""
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
        assert self._speller is not None
        processor, stopper = _generation_hooks(self._speller, self._token_strings, width)
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([processor]),
                stopping_criteria=StoppingCriteriaList([stopper]),
                eos_token_id=self._eos_id,
                pad_token_id=self._pad_id,
            )
        new = out[:, width:].tolist()
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        return [ANSWER_PREFIX + t for t in texts]

    def _to_prediction(self, raw: str, truncated: int) -> Prediction:
        answer, error, repaired = parse_llm_json(raw, self.labels)
        if answer is None:
            why = error or "unknown"
            return Prediction(
                label=None,
                confidence=None,
                output={
                    "status": "invalid_output",
                    "raw": raw,
                    "error": why,
                    "truncated_tokens": truncated,
                },
                error=f"LLM output was not valid JSON after one repair: {why}",
            )
        scores: dict[str, float] | None = (
            {answer["category"]: answer["confidence"]} if answer["confidence"] is not None else None
        )
        output = {
            "status": "ok",
            **answer,
            "raw": raw,
            "repaired": repaired,
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
    speller: CategorySpeller, token_strings: Sequence[str], prompt_len: int
) -> tuple[Any, Any]:
    """A LogitsProcessor that enforces the category spelling and a StoppingCriteria that
    ends a row once its JSON object is closed. Built per call (they hold row state)."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    def generated_text(row: Sequence[int]) -> str:
        return "".join(token_strings[i] if i < len(token_strings) else "" for i in row)

    class _CategoryProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.done: set[int] = set()

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
            new = input_ids[:, prompt_len:].tolist()
            masked = None
            for row, ids in enumerate(new):
                if row in self.done:
                    continue
                allowed = speller.allowed(generated_text(ids))
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
            flags = [json_object_closed(ANSWER_PREFIX + generated_text(ids)) for ids in new]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return _CategoryProcessor(), _JsonClosed()
