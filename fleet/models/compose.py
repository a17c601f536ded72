"""Composed conversations for training: each request among small talk, as a served
tier reads long conversations.

A tier reads a long conversation in windows of `max_length` tokens
(`workers.adapters.windowed`): one window usually holds the request with small
talk around it, the others small talk alone. A training file of short, clean
requests shows the model neither, and `bench.long` measured what follows: the
bundled intent model gave 2,274 of 3,175 small-talk user turns a label other than
`chitchat` at >= 0.5, and in 43 of its 47 errors on long conversations the
request shared its window with small talk.

`compose_examples` adds two kinds of training examples, built from a filler file
of small-talk turns (`config/data/smalltalk.jsonl`: user and assistant turns
written for this, in many voices, apart from every evaluation set):

* **request in context**: for every example whose label is not a background
  label, `per_example` conversations of filler turns before and/or after it
  (its position drawn at random), labelled as the example;
* **background only**: conversations of filler alone, labelled as the tier's
  first background label (`background_labels`, e.g. `chitchat`), one for every
  `background_every` requests.

Each composed conversation is drawn to a random length between a third of the
window and the whole window and never longer (`fits`): a conversation longer
than one window would be split by `encode_rows`, and a window of filler alone
labelled with the request's label would teach the opposite of what is meant.

A tier that reads long conversations one user turn at a time (`window_by =
"user_turns"`) reads each small-talk user turn alone, not among other turns. For
it, `by_turn = True` adds a third kind:

* **one small-talk turn**: every user line of the filler once, as a one-turn
  conversation labelled as the first background label: the window such a tier
  reads for a small-talk turn (with `turn_context` 0, exactly that window).

This is data augmentation by composition, the multiple-instance view of a long
document (its label is the label of the part that carries it; Dietterich et al.
1997, "Solving the multiple instance problem with axis-parallel rectangles"):
the model learns that filler around a request does not change the request's
label and that filler alone is background. Seeded: the same seed, examples
and filler give the same compositions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.models.labeled import Example, TrainingDataError
from workers.adapters.llm_prompt import render_transcript
from workers.adapters.windowed import text_data

ROLES = ("user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class Filler:
    """Small-talk turns to compose with: user lines and assistant lines."""

    user: tuple[str, ...]
    assistant: tuple[str, ...]


def filler_sha256(path: str | Path) -> str:
    """The sha256 of a filler file's bytes (recorded in training_metrics.json; a bundled
    folder composed with another version of the file is retrained)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_filler(path: str | Path) -> Filler:
    """Read a filler file: JSONL, one `{"role": "user"|"assistant", "content": str}` a line.

    Raises TrainingDataError (naming the line) for a line that is not such an
    object, and when either role has no line (both are needed to compose a
    conversation).
    """
    path = Path(path)
    users: list[str] = []
    bots: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TrainingDataError(f"cannot read the filler file {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TrainingDataError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or row.get("role") not in ROLES:
            raise TrainingDataError(f'{where}: needs "role": "user" or "assistant"')
        content = row.get("content")
        if not isinstance(content, str) or not content.strip() or "\n" in content:
            raise TrainingDataError(f'{where}: "content" must be one non-empty line of text')
        (users if row["role"] == "user" else bots).append(content.strip())
    if not users or not bots:
        raise TrainingDataError(
            f"{path}: a filler file needs both user and assistant turns "
            f"(has {len(users)} user, {len(bots)} assistant)"
        )
    return Filler(tuple(users), tuple(bots))


def _request_turns(text: str) -> list[Message]:
    """An example's text as messages: `role: content` lines as the fleet reads them back
    (`workers.adapters.windowed.text_data`: a conversation example), anything else as
    one user turn."""
    data = text_data(text)
    if "messages" in data:
        return list(data["messages"])
    return [
        {"role": "user", "content": " ".join(ln.strip() for ln in text.split("\n") if ln.strip())}
    ]


def _pairs(rng: random.Random, filler: Filler, n: int) -> list[Message]:
    """n small-talk exchanges: a user line, then most often an assistant reply."""
    out: list[Message] = []
    for _ in range(n):
        out.append({"role": "user", "content": rng.choice(filler.user)})
        if rng.random() < 0.8:
            out.append({"role": "assistant", "content": rng.choice(filler.assistant)})
    return out


def _fit(
    before: list[Message],
    core: list[Message],
    after: list[Message],
    budget: int,
    count_tokens: Callable[[str], int],
) -> list[Message] | None:
    """Drop filler turns (the outermost first, alternately after and before) until
    the rendered conversation is at most `budget` tokens; None when the core alone
    does not fit."""
    before, after = list(before), list(after)
    turn = 0
    while True:
        turns = before + core + after
        if count_tokens(render_transcript(turns)) <= budget:
            return turns
        if not before and not after:
            return None
        if (turn % 2 == 0 and after) or not before:
            after.pop()
        else:
            before.pop(0)
        turn += 1


def compose_examples(
    examples: Sequence[Example],
    filler: Filler,
    *,
    background: Sequence[str],
    max_tokens: int,
    count_tokens: Callable[[str], int],
    per_example: int = 1,
    background_every: int = 4,
    seed: int = 0,
    by_turn: bool = False,
) -> list[Example]:
    """Composed conversations (request in context; background only) for `examples`.

    `background`: the tier's background labels (the first one labels filler-only
    conversations); examples carrying one are not composed around. `max_tokens`:
    the window (the served `max_length`); `count_tokens(text)` counts a rendered
    conversation's tokens with the model's tokenizer, special tokens included.
    Returns the new examples only (weights copied from the request); an example
    too long to fit a window with any filler is composed without filler, i.e.
    skipped. `by_turn`: also every distinct filler user line alone, labelled as the
    first background label (a tier reading by user turn; added after the others, so
    the rest is drawn as without it). Raises ValueError for an empty `background`
    or `per_example` < 0.
    """
    if not background:
        raise ValueError("composing needs the tier's background_labels (e.g. chitchat)")
    if per_example < 0 or background_every < 1:
        raise ValueError("per_example must be >= 0 and background_every >= 1")
    rng = random.Random(seed)
    skip = set(background)
    out: list[Example] = []
    requests = [ex for ex in examples if ex.label not in skip and ex.labels is None]
    for ex in requests:
        core = _request_turns(ex.text)
        for _ in range(per_example):
            budget = rng.randint(max(max_tokens // 3, 16), max_tokens)
            where = rng.choice(("before", "after", "around", "before"))
            n = rng.randint(2, 6)
            before = _pairs(rng, filler, n) if where in ("before", "around") else []
            after = _pairs(rng, filler, rng.randint(1, 3)) if where in ("after", "around") else []
            reply = (
                [{"role": "assistant", "content": rng.choice(filler.assistant)}]
                if rng.random() < 0.5
                else []
            )
            turns = _fit(before, core + reply, after, budget, count_tokens)
            if turns is not None and turns != core + reply:
                out.append(Example(render_transcript(turns), ex.label, ex.weight))
    for _ in range(len(requests) * per_example // background_every):
        budget = rng.randint(max(max_tokens // 3, 16), max_tokens)
        turns = _fit(_pairs(rng, filler, rng.randint(2, 8)), [], [], budget, count_tokens)
        if turns:
            out.append(Example(render_transcript(turns), background[0], 1.0))
    if by_turn:
        for line in dict.fromkeys(filler.user):
            talk = [{"role": "user", "content": line}]
            if count_tokens(render_transcript(talk)) <= max_tokens:
                out.append(Example(render_transcript(talk), background[0], 1.0))
    return out
