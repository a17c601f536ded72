"""Long conversations for `bench.long`, composed from the hand-written turns of
`bench.long_turns` (nothing here comes from a training file).

    build_long_set(seed=0) -> list of rows
      {"external_id", "messages", "label", "position", "decisive", "held_out"}

Each decisive request (6 per label, 7 labels: chitchat is the filler, so it is
never the decisive label of a long item) is placed once in each of five positions:

  start             the request, a generic assistant reply, then long small talk
  middle            small talk, the request and a reply, more small talk
  end               small talk with one old resolved thread, then the request last
  after_small_talk  a long run of small talk only, then the request
  appended          small talk, two old resolved threads, then the request appended

The filler is drawn without repetition within a conversation until the text passes
`min_chars` (about 3,400 characters: well over 512 MiniLM tokens). Seeded: the
same seed gives the same set. Decisive turns 4 and 5 of each label are held out
(`held_out`): never used to choose a setting.
"""

from __future__ import annotations

import random
from typing import Any

from bench.long_turns import (
    ACKNOWLEDGE,
    DECISIVE,
    OLD_THREADS,
    SMALL_TALK_ASSISTANT,
    SMALL_TALK_USER,
)

POSITIONS = ("start", "middle", "end", "after_small_talk", "appended")
HELD_OUT = (4, 5)

Message = dict[str, str]


def _size(messages: list[Message]) -> int:
    return sum(len(m["role"]) + 2 + len(m["content"]) + 1 for m in messages)


def _small_talk(rng: random.Random, chars: int) -> list[Message]:
    """User/assistant small-talk pairs until `chars` characters, no line twice."""
    users = rng.sample(SMALL_TALK_USER, len(SMALL_TALK_USER))
    bots = rng.sample(SMALL_TALK_ASSISTANT, len(SMALL_TALK_ASSISTANT))
    out: list[Message] = []
    while _size(out) < chars and users:
        out.append({"role": "user", "content": users.pop()})
        if bots:
            out.append({"role": "assistant", "content": bots.pop()})
    return out


def _thread(k: int) -> list[Message]:
    return [{"role": r, "content": c} for r, c in OLD_THREADS[k % len(OLD_THREADS)]]


def compose(request: str, position: str, rng: random.Random, *, min_chars: int) -> list[Message]:
    """One conversation holding `request` (a user turn) at `position` (POSITIONS).

    Raises ValueError for an unknown position."""
    ask = {"role": "user", "content": request}
    ack = {"role": "assistant", "content": rng.choice(ACKNOWLEDGE)}
    if position == "start":
        return [ask, ack, *_small_talk(rng, min_chars)]
    if position == "middle":
        half = min_chars // 2
        talk = _small_talk(rng, min_chars + 200)
        cut = next(i for i in range(0, len(talk), 2) if _size(talk[:i]) >= half)
        return [*talk[:cut], ask, ack, *talk[cut:]]
    if position == "end":
        return [*_small_talk(rng, min_chars - 300), *_thread(rng.randrange(4)), ask]
    if position == "after_small_talk":
        return [*_small_talk(rng, min_chars + 600), ask]
    if position == "appended":
        first = rng.randrange(len(OLD_THREADS))
        threads = [*_thread(first), *_thread(first + 1)]
        talk = _small_talk(rng, min_chars - _size(threads) + 300)
        return [*talk, *threads, ask]
    raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")


def build_long_set(seed: int = 0, *, min_chars: int = 3400) -> list[dict[str, Any]]:
    """Every decisive request in every position: 7 labels x 6 requests x 5 positions."""
    rng = random.Random(seed)
    rows = []
    for label, requests in DECISIVE.items():
        for k, request in enumerate(requests):
            for position in POSITIONS:
                rows.append(
                    {
                        "external_id": f"long-{label}-{k}-{position}",
                        "messages": compose(request, position, rng, min_chars=min_chars),
                        "label": label,
                        "position": position,
                        "decisive": k,
                        "held_out": k in HELD_OUT,
                    }
                )
    return rows


def build_small_talk_set(
    seed: int = 0, *, n: int = 42, min_chars: int = 3400
) -> list[dict[str, Any]]:
    """Long conversations of small talk only (nothing to act on: `not_worthy` for the
    worthiness task), as long as the long set's; the odd-numbered half is held out."""
    rng = random.Random(seed + 1)
    return [
        {
            "external_id": f"talk-{k}",
            "messages": _small_talk(rng, min_chars),
            "label": "not_worthy",
            "position": "small_talk_only",
            "decisive": None,
            "held_out": k % 2 == 1,
        }
        for k in range(n)
    ]


def alone_set() -> list[dict[str, Any]]:
    """The decisive requests alone, one user turn each (the short reading of the same asks)."""
    return [
        {
            "external_id": f"alone-{label}-{k}",
            "messages": [{"role": "user", "content": request}],
            "label": label,
            "decisive": k,
            "held_out": k in HELD_OUT,
        }
        for label, requests in DECISIVE.items()
        for k, request in enumerate(requests)
    ]
