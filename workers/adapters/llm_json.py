"""The LLM's JSON answer: parse, validate, repair at most once, and the constraint that
spells the category.

Pure Python (no torch, no model): these decide whether a small model's generated
answer is kept, repaired or failed, so every branch is unit tested
(tests/unit/test_llm_json.py). Used by `workers.adapters.llm_classify` for its
"generate" method and for the reasoning generated after label scoring.

Field policy of the answer (see `validate_answer`):
  * category: required and exactly one of the labels, else the item fails.
  * confidence: a number (or numeric string) in [0, 1]; anything else (missing, "high",
    85, -1, NaN, a number cut by the token limit) keeps the category but sets
    confidence None and records why under `field_errors`.
  * reasoning: string (missing -> ""); key_entities: list of strings (missing -> []);
    secondary_categories: known labels only, main category and duplicates removed.
    Invalid values of these become their empty default, recorded in `field_errors`.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Collection, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_SOFT_FIELDS = ("confidence", "reasoning", "key_entities", "secondary_categories")


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
