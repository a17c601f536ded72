"""Training examples from the labels people confirmed (`fleet train --confirmed`).

Each row of confirmed_labels for the task becomes an Example of the text the
model reads (a conversation as `role: content` lines, as the serving adapter
builds it) with the reviewer's label and weight 1.0, whether the reviewer
confirmed the model's answer or corrected it. They are added to the rest of
the training set (a file, another task's results, or the bundled set); an
example of the rest with the same text is dropped, so the reviewer's label wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text

from db.engine import get_engine
from fleet.models.labeled import MAX_TEXT_CHARS, Example
from workers.adapters.base import InputError
from workers.adapters.text import conversation_text

CONFIRMED_SQL = """
    SELECT cl.label, c.messages FROM confirmed_labels cl
    JOIN conversations c ON cl.source_kind = 'conversation' AND c.id = cl.source_id
    WHERE cl.task = :task ORDER BY cl.id
"""


@dataclass(frozen=True)
class ConfirmedSet:
    """The confirmed examples, and how many confirmed labels could not be read."""

    examples: list[Example]
    unreadable: int


def confirmed_examples(url: str, *, task: str) -> ConfirmedSet:
    """Every confirmed label of `task` over conversations, as weight-1.0 examples
    (audio rows are not read: their text is another task's output)."""
    out: list[Example] = []
    bad = 0
    with get_engine(url).connect() as conn:
        for label, messages in conn.execute(text(CONFIRMED_SQL), {"task": task}):
            try:
                body = conversation_text({"messages": messages}, max_chars=MAX_TEXT_CHARS)
            except InputError:
                bad += 1
                continue
            out.append(Example(body, str(label), 1.0))
    return ConfirmedSet(out, bad)


def merge(rest: Sequence[Example], confirmed: Sequence[Example]) -> list[Example]:
    """`rest` without the texts people reviewed, then the confirmed examples."""
    reviewed = {e.text for e in confirmed}
    return [e for e in rest if e.text not in reviewed] + list(confirmed)
