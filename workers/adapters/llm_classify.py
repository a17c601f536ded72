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
from workers.adapters.label_scoring import (
    CONTENT_FREE_INPUTS,
    calibrated,
    label_distribution,
    mean_distribution,
    per_label_logprobs,
    prefix_cache_for,
    score_continuations,
)
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
# Label scoring: the answer starts with SCORING_LEAD and each label's phrases are
# scored as its continuation. Chosen on SmolLM2-135M: natural phrases score far
# better than label names in JSON (see docs/benchmarks.md).
SCORING_SYSTEM = "You classify conversations by topic."
SCORING_TEMPLATE = "Conversation:\n{conversation}\n\nWhat is this conversation about?"
SCORING_LEAD = "This conversation is about"
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


def load_examples(path: str | None, labels: Mapping[str, str], k: int) -> list[tuple[str, str]]:
    """k few-shot examples as (transcript, label) from a labeled JSONL file.

    Rows hold "label" and either "messages" (a conversation) or "text". A relative
    path is looked up under the package's fleet/data folder first. The choice is fixed
    and balanced: the first unused example of each label in turn (label order), so
    every label is shown before any is shown twice. Raises ValueError for a missing
    file, a row that is not JSON, or a label that is not configured.
    """
    if not path or k <= 0:
        return []
    from importlib import resources
    from pathlib import Path

    file = Path(path)
    if not file.is_absolute() and not file.is_file():
        file = Path(str(resources.files("fleet").joinpath("data", path)))
    if not file.is_file():
        raise ValueError(
            f"few-shot examples file {path!r} not found (absolute, or under fleet/data)"
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
    relative path is under fleet/data) maps label -> {"verbalizers": [phrases]} (or,
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
    """An absolute path, or one under the package's fleet/data folder."""
    from importlib import resources
    from pathlib import Path

    file = Path(path)
    if not file.is_absolute() and not file.is_file():
        file = Path(str(resources.files("fleet").joinpath("data", path)))
    if not file.is_file():
        raise ValueError(f"{what} file {path!r} not found (absolute, or under fleet/data)")
    return file


def _continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as it is tokenized after `context` (falls back to
    tokenizing it alone when the two merge across the boundary)."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return list(full[len(base) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def reasoning_fields(raw: str, cut: bool, max_new_tokens: int) -> dict[str, Any]:
    """reasoning, key_entities and field_errors from a generated explanation.

    `raw` starts with the forced `{"category": "...", "reasoning": "`; the category in
    it is already fixed and not read back. A field the token limit cut is left empty
    and its reason recorded (never a half value presented as whole).
    """
    errors: dict[str, str] = {}
    limit = f"the answer was cut off at the token limit (max_new_tokens={max_new_tokens})"
    fixed = None
    try:
        obj = json.loads(raw)
    except ValueError:
        fixed = repair_json(raw)
        obj = json.loads(fixed) if fixed is not None else {}
    if not isinstance(obj, dict):
        obj = {}
    reasoning = obj.get("reasoning")
    entities = obj.get("key_entities")
    if fixed is not None and cut:
        # The last field the model was writing when it ran out is incomplete.
        states = _scan_states(raw[raw.find("{") :])
        in_string, stack = states[-1]
        if in_string and "key_entities" not in obj:
            reasoning = None
            errors["reasoning"] = f"incomplete: {limit}"
        elif "[" in stack:
            errors["key_entities"] = f"incomplete (last entry dropped): {limit}"
            entities = list(entities or [])[:-1] if in_string else entities
    if not isinstance(reasoning, str):
        errors.setdefault("reasoning", "missing" if not cut else f"missing: {limit}")
        reasoning = ""
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        if entities is not None:
            errors.setdefault("key_entities", f"not a list of strings (got {entities!r})")
        elif cut:
            errors.setdefault("key_entities", f"missing: {limit}")
        entities = []
    return {"reasoning": reasoning, "key_entities": entities, "field_errors": errors}


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
    a dangling key; it never invents values: a number (or true/false/null) not followed
    by a delimiter in the original text may have been cut (`0.` of `0.85`), so a prefix
    ending in one is not taken and the field is left out. None when nothing parses.
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
        elif _cut_scalar(body, cut):
            continue  # "confidence": 0. is a number that was cut, not the value 0
        candidate = candidate.rstrip().rstrip(",").rstrip()
        closers = "".join("}" if b == "{" else "]" for b in reversed(stack))
        try:
            json.loads(candidate + closers)
        except ValueError:
            continue
        return candidate + closers
    return None


def _cut_scalar(body: str, cut: int) -> bool:
    """Whether body[:cut] ends in a bare scalar (number, true, false, null) that the
    original text does not visibly end with a delimiter (space, comma, bracket)."""
    head = body[:cut].rstrip()
    if not head or head[-1] in '"{}[],:':
        return False
    nxt = body[len(head)] if len(head) < len(body) else ""
    return nxt == "" or nxt not in " \t\r\n,}]"


def _single_quoted(text: str) -> bool:
    """A Python-style dict ({'category': ...}) rather than JSON."""
    start = text.find("{")
    return start >= 0 and text[start + 1 :].lstrip().startswith("'")


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
        if _single_quoted(text):
            return (
                None,
                "the reply uses single quotes (a Python dict), not JSON's double quotes",
                False,
            )
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
    {"messages" or "text", "label"}; relative paths are under fleet/data) with `shots`
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
