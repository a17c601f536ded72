"""The prompt pieces of `llm_classify`: instructions, the transcript, truncation,
few-shot examples, label phrases (verbalizers) and where the conversation goes in a
chat template.

Pure functions over strings and token ids (a tokenizer is passed in where one is
needed), so they are unit tested without a model; `workers.adapters.llm_classify`
assembles them at load time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.windows import Segment, fit_turns

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
    file = data_file(path, "few-shot examples")
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


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as it is tokenized after `context` (falls back to
    tokenizing it alone when the two merge across the boundary)."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return list(full[len(base) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def label_continuations(
    tokenizer: Any, phrases: Sequence[Sequence[str]], context: str
) -> tuple[list[list[int]], list[int]]:
    """The token ids of every label phrase as scored after `context` (" " + phrase), and
    the label index owning each: phrases[k] are label k's phrases."""
    label_ids: list[list[int]] = []
    owners: list[int] = []
    for k, label_phrases in enumerate(phrases):
        for phrase in label_phrases:
            label_ids.append(continuation_ids(tokenizer, context, " " + phrase))
            owners.append(k)
    return label_ids, owners


@dataclass(frozen=True)
class TurnIds:
    """A conversation's non-empty turns as token ids of their `role: content` lines
    (how `render_transcript` writes them), and the ids of the newline between lines."""

    roles: list[str]
    ids: list[list[int]]
    newline: list[int]

    @classmethod
    def of(
        cls, messages: Sequence[Mapping[str, str]], body_ids: Callable[[str], list[int]]
    ) -> TurnIds:
        """`body_ids` tokenizes a text the way the prompt does."""
        lines = [m for m in messages if m["content"].strip()]
        return cls(
            [m["role"] for m in lines],
            [body_ids(f"{m['role']}: {m['content']}") for m in lines],
            body_ids("\n"),
        )

    def counts(self) -> list[tuple[str, int]]:
        """(role, token count) per turn, what workers.windows plans with."""
        return [(role, len(i)) for role, i in zip(self.roles, self.ids, strict=True)]

    def join(self, segments: Iterable[Segment]) -> list[int]:
        """The ids of the segments' token ranges, one line each, joined by newlines."""
        body: list[int] = []
        for k, seg in enumerate(segments):
            body += (self.newline if k else []) + self.ids[seg.turn][seg.start : seg.end]
        return body


def user_turns_body(
    messages: Sequence[Mapping[str, str]],
    body_ids: Callable[[str], list[int]],
    room: int,
    assistant_tokens: int,
) -> tuple[list[int], int]:
    """The transcript fitted around the user's turns (workers.windows.fit_turns) into
    `room` tokens: (ids of the kept `role: content` lines joined by newlines, tokens
    left out). `body_ids` tokenizes a text the way the prompt does."""
    turns = TurnIds.of(messages, body_ids)
    room -= len(turns.newline) * len(turns.ids)
    segments, dropped = fit_turns(turns.counts(), max(room, 1), assistant_cap=assistant_tokens)
    return turns.join(segments), dropped
