"""Encoder input for a whole conversation: token windows built with `workers.windows`.

The one place that turns a conversation into window token ids, used by the
encoder adapters (`sequence_classify`, `zero_shot`) at serving time and by
`fleet train` when it builds its examples, so both read a conversation the same way.

A conversation whose joined text ("role: content" lines) fits `max_length`
tokens is one window holding exactly the ids the head-truncating reader built
before: a short conversation gets the same input, hence the same label.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workers.adapters.text import conversation_messages, is_blank
from workers.windows import POOLING_RULES, Pooled, WindowPlan, build_turn_windows, build_windows

DEFAULT_POOLING = "salient"
DEFAULT_MAX_WINDOWS = 16
DEFAULT_OVERLAP = 32
WINDOW_BY = ("tokens", "user_turns")
DEFAULT_WINDOW_BY = "tokens"
DEFAULT_TURN_CONTEXT = 0


@dataclass(frozen=True)
class Reading:
    """How an encoder tier reads a conversation (tier options `pooling`,
    `max_windows`, `window_overlap`, `window_by`, `turn_context`; `max_length`
    is the tier's). `window_by`: "tokens" packs whole turns into windows of
    max_length (workers.windows.build_windows); "user_turns" reads each user
    turn as its own window with the last `turn_context` tokens of the turn
    before it (build_turn_windows). Either way a conversation that fits
    max_length is one window, read whole."""

    max_length: int
    pooling: str = DEFAULT_POOLING
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    overlap: int = DEFAULT_OVERLAP
    window_by: str = DEFAULT_WINDOW_BY
    turn_context: int = DEFAULT_TURN_CONTEXT

    @classmethod
    def from_options(cls, max_length: int, options: dict[str, Any]) -> Reading:
        """Raises ValueError for an unknown pooling rule or window_by, a
        max_windows below 1 or a negative turn_context."""
        pooling = str(options.get("pooling", DEFAULT_POOLING))
        if pooling not in POOLING_RULES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_RULES)}, got {pooling!r}")
        max_windows = options.get("max_windows", DEFAULT_MAX_WINDOWS)
        if max_windows is not None and int(max_windows) < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        overlap = int(options.get("window_overlap", DEFAULT_OVERLAP))
        window_by = str(options.get("window_by", DEFAULT_WINDOW_BY))
        if window_by not in WINDOW_BY:
            raise ValueError(f"window_by must be one of {', '.join(WINDOW_BY)}, got {window_by!r}")
        turn_context = int(options.get("turn_context", DEFAULT_TURN_CONTEXT))
        if turn_context < 0:
            raise ValueError(f"turn_context must be 0 or more tokens, got {turn_context}")
        return cls(
            max_length=max_length,
            pooling=pooling,
            max_windows=None if max_windows is None else int(max_windows),
            overlap=overlap,
            window_by=window_by,
            turn_context=turn_context,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "pooling": self.pooling,
            "max_windows": self.max_windows,
            "window_overlap": self.overlap,
            "window_by": self.window_by,
            "turn_context": self.turn_context,
        }


@dataclass(frozen=True)
class Windows:
    """One item's window inputs: token ids per window (special tokens included) and the plan."""

    ids: list[list[int]]
    plan: WindowPlan

    @property
    def cost(self) -> int:
        """What the batch budget counts: padded tokens of the item's windows."""
        return max(len(w) for w in self.ids) * len(self.ids)


def turns_of(data: dict[str, Any], *, max_chars: int) -> list[tuple[str, str]]:
    """(role, line) per message: "role: content" lines, or the bare text of a
    transcript. A blank message keeps its place with an empty line."""
    messages = conversation_messages(data, max_chars=max_chars)
    if len(messages) == 1 and "text" in data:
        return [("user", messages[0]["content"])]
    return [
        (m["role"], "" if is_blank(m["content"]) else f"{m['role']}: {m['content']}")
        for m in messages
    ]


# Whether each loaded tokenizer has tokens for emoji, asked once per tokenizer and
# forgotten with it (a worker that unloads a tier does not keep its tokenizer alive).
_READS_EMOJI: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _reads_emoji(tokenizer: Any) -> bool:
    known = _READS_EMOJI.get(tokenizer)
    if known is None:
        unk = getattr(tokenizer, "unk_token", None)
        known = unk is None or unk not in tokenizer.tokenize("\U0001f642 \U0001f621")
        _READS_EMOJI[tokenizer] = known
    return known


def readable(tokenizer: Any, line: str) -> str:
    """`line` as the tokenizer can read it: where its vocabulary has no emoji (BERT's
    WordPiece, MiniLM: every emoji is [UNK], so "train cancelled again 🙄" and
    "😍😍" lose what they say), each emoji is replaced by its CLDR
    short name in words ("face with rolling eyes", the `emoji` package's names),
    as BERTweet's normalisation does (Nguyen et al. 2020, "BERTweet: A pre-trained
    language model for English Tweets"). Unchanged for a tokenizer that reads emoji (byte-level
    BPE: GPT-2, RoBERTa, SmolLM) and for text without any."""
    if not line or _reads_emoji(tokenizer):
        return line
    import emoji

    if not emoji.emoji_count(line):
        return line
    return emoji.replace_emoji(
        line, replace=lambda _, data: " " + data["en"].strip(":").replace("_", " ") + " "
    )


def encode_windows(
    tokenizer: Any, data: dict[str, Any], reading: Reading, *, max_chars: int, split: bool = False
) -> Windows:
    """Validate a conversation (InputError) and build its window token ids.

    The joined text is tokenized whole first: when it fits `max_length` it is the
    single window (unless `split`: a turn selector reads every user turn on its
    own, however short the conversation). Otherwise each turn is tokenized without special tokens, the
    turns are windowed by `build_windows` (or `build_turn_windows` when the
    reading is by user turn; window size = max_length minus the tokenizer's
    special tokens) and each window's ids get the special tokens back
    (`special_tokens`). Emoji the tokenizer cannot read are read as their names
    (`readable`).
    """
    turns = [
        (role, readable(tokenizer, line)) for role, line in turns_of(data, max_chars=max_chars)
    ]
    per_turn = [
        tokenizer(line, add_special_tokens=False, verbose=False)["input_ids"] if line else []
        for _, line in turns
    ]
    counts = [(role, len(ids)) for (role, _), ids in zip(turns, per_turn, strict=True)]
    whole = tokenizer("\n".join(line for _, line in turns if line), verbose=False)["input_ids"]
    if len(whole) <= reading.max_length and not split:
        return Windows([whole], build_windows(counts, size=max(sum(n for _, n in counts), 1)))
    size = reading.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if size < 2:
        raise ValueError(f"max_length {reading.max_length} leaves no room for text")
    if reading.window_by == "user_turns":
        plan = build_turn_windows(
            counts,
            size=size,
            overlap=min(reading.overlap, size // 2),
            context=min(reading.turn_context, size // 2),
            max_windows=reading.max_windows,
        )
    else:
        plan = build_windows(
            counts,
            size=size,
            overlap=min(reading.overlap, size // 2),
            max_windows=reading.max_windows,
        )
    head, tail = special_tokens(tokenizer)
    ids = [
        head + [t for s in w.segments for t in per_turn[s.turn][s.start : s.end]] + tail
        for w in plan.windows
    ]
    return Windows(ids, plan)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one text ([CLS] / [SEP] for BERT,
    <s> / </s> for RoBERTa), read off the encoding of a one-word text."""
    full = list(tokenizer("x")["input_ids"])
    inner = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for k in range(len(full) - len(inner) + 1):
        if full[k : k + len(inner)] == inner:
            return full[:k], full[k + len(inner) :]
    raise ValueError("cannot find where this tokenizer puts its special tokens")


def reading_output(windows: Windows, pooled: Pooled, reading: Reading) -> dict[str, Any]:
    """What the result records about the reading: windows read, the deciding
    window (its turns), the pooling rule, and anything not read."""
    plan = windows.plan
    out: dict[str, Any] = {
        "windows": len(plan.windows),
        "tokens_read": sum(len(w) for w in windows.ids),
    }
    if len(plan.windows) > 1:
        decided = plan.windows[pooled.deciding]
        out["pooling"] = reading.pooling
        out["window_by"] = reading.window_by
        out["deciding_window"] = pooled.deciding
        out["deciding_turns"] = [decided.turns[0], decided.turns[-1]]
    if plan.skipped:
        out["unread"] = plan.unread()
        out["tokens_unread"] = plan.tokens_unread
    return out


ROLE_PREFIXES = ("user", "assistant", "system", "human", "customer", "caller", "agent", "bot")


def text_data(text: str) -> dict[str, Any]:
    """A labeled example's text as the conversation the fleet would serve.

    Text of `role: content` lines (how `fleet.models.labeled` stores a
    conversation, and how the encoders read one) becomes its messages again, so
    training windows follow the same turn boundaries as serving; a line without a
    known role prefix continues the turn before it. Text that does not start
    with a role is one bare text ({"text": ...}), as a transcript is served."""
    lines = text.split("\n")
    if not any(lines[0].startswith(f"{r}: ") for r in ROLE_PREFIXES):
        return {"text": text}
    messages: list[dict[str, str]] = []
    for line in lines:
        role = next((r for r in ROLE_PREFIXES if line.startswith(f"{r}: ")), None)
        if role is None:
            messages[-1]["content"] += "\n" + line
        else:
            messages.append({"role": role, "content": line[len(role) + 2 :]})
    return {"messages": messages}


def background_indices(names: Sequence[str], options: dict[str, Any]) -> tuple[int, ...]:
    """Indices (in `names`' order) of the tier's `background_labels` (small talk,
    greetings: what the `salient` pooling rule looks past). Raises ValueError,
    naming the labels the model has, for a name it does not have."""
    wanted = options.get("background_labels", ())
    if isinstance(wanted, str):
        wanted = (wanted,)
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(
            f"background_labels {missing} are not labels of this model; it has: {', '.join(names)}"
        )
    return tuple(i for i, n in enumerate(names) if n in set(wanted))


def check_trained_reading(saved: dict[str, Any] | None, reading: Reading, *, model: str) -> None:
    """Raise ValueError when a folder trained by `fleet train` (config.json key
    `fleet_reading`) was trained on windows of another length than the tier reads:
    what is trained and what is served must not differ. Folders without the key
    (trained elsewhere) are not checked."""
    if not saved or "max_length" not in saved:
        return
    if int(saved["max_length"]) != reading.max_length:
        raise ValueError(
            f"{model} was trained on windows of {saved['max_length']} tokens but this tier "
            f"reads {reading.max_length}: set max_length = {saved['max_length']} on the tier "
            "or retrain with `fleet train` (it takes the tier's max_length)"
        )
