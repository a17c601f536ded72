"""Select, then classify: an encoder picks the user turn an LLM tier scores.

A small instruct LLM read one user turn at a time is swayed by small talk that
names a topic in passing ("my neighbour is learning the trumpet" scored
`learning` at 0.9+), while the same LLM labels the decisive request alone right
in most cases. An encoder trained as it is read (one user turn, small talk alone
as background) finds that request reliably. With the llm_classify tier option
`turn_selector = "<encoder folder>"` a conversation read per user turn goes:

    every user turn -> the encoder (one window per turn, sequence_classify)
                    -> the tier's pooling rule over its background labels
                       (`margin`: the turn whose best label beats background most)
                    -> that turn alone -> the LLM's label scoring (the result)

This is the key-block selection of CogLTX (Ding et al. 2020, "CogLTX: Applying
BERT to Long Texts"): a judge model picks the blocks a reasoner reads, here one
user turn. The LLM scores one prompt per long conversation instead of one per
turn. The result's `output.reading.selector` names the selector, its label and
margin for the picked turn, so a person can see why that turn was read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.taskconfig import TierSpec
from workers.adapters.windowed import Reading, Windows, background_indices, encode_windows
from workers.windows import Pooled, pool

DEFAULT_SELECTOR_MAX_LENGTH = 256


@dataclass(frozen=True)
class Pick:
    """The selector's reading of one conversation: its turn windows, the pooled
    result (its `deciding` window is the picked turn's), the selector's label and
    how far that label leads the background in the picked window."""

    windows: Windows
    pooled: Pooled
    label: str
    margin: float

    @property
    def turn(self) -> int:
        """The index (into the conversation's turns) of the picked user turn."""
        return self.windows.plan.windows[self.pooled.deciding].segments[-1].turn

    def at(self, windows: Windows) -> Selected | None:
        """The LLM's window (in `windows`, its own per-turn windows) holding the picked
        turn (its first piece when the turn was cut), or None when the LLM's reading
        does not hold that turn (its max_windows left it unread)."""
        for k, w in enumerate(windows.plan.windows):
            if w.segments[-1].turn == self.turn:
                return Selected(k, self.windows, self.pooled, self.label, self.margin, self.turn)
        return None


@dataclass(frozen=True)
class Selected:
    """A pick placed in the LLM's reading: `window` indexes the LLM's windows."""

    window: int
    windows: Windows
    pooled: Pooled
    label: str
    margin: float
    turn: int


class TurnSelector:
    """A sequence_classify encoder that picks one user turn of a long conversation.

    Built from an llm_classify tier's options (`from_tier`); `windows` builds a
    conversation's per-turn windows (prepare, CPU), `select` runs the encoder over
    a sub-batch's windows in one pass (predict)."""

    def __init__(self, adapter: Any, reading: Reading, background: tuple[int, ...], name: str):
        self.adapter = adapter
        self.reading = reading
        self.background = background
        self.name = name
        self.names: list[str] = list(adapter.model.config.id2label.values())

    @classmethod
    def from_tier(cls, tier: TierSpec, reading: Reading | None, device: str) -> TurnSelector | None:
        """The tier's selector, loaded on `device`, or None without `turn_selector`.

        Options: `turn_selector` (an encoder folder: absolute, or under the models
        folder, resolved by the worker like a tier's path), `turn_selector_max_length`
        (default 256 tokens per turn window), the tier's `pooling` and
        `background_labels` (label names of the selector's model). Raises ValueError
        when the tier does not read by user turn, the folder holds no model, or a
        background label is not one of the selector's labels."""
        path = tier.options.get("turn_selector")
        if not path:
            return None
        if reading is None:
            raise ValueError(
                f"tier {tier.name}: turn_selector needs window_by = 'user_turns' "
                "(the selector picks one user turn of a long conversation)"
            )
        folder = Path(str(path)).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"tier {tier.name}: turn_selector folder {folder} holds no model; "
                "run `fleet models prepare` (the bundled intent-minilm) or train one with "
                "`fleet train`"
            )
        from workers.adapters.sequence_classify import SequenceClassifyAdapter

        options = {
            "window_by": "user_turns",
            "pooling": reading.pooling,
            "max_windows": reading.max_windows,
            "background_labels": tier.options.get("background_labels", ()),
        }
        max_length = int(tier.options.get("turn_selector_max_length", DEFAULT_SELECTOR_MAX_LENGTH))
        encoder = SequenceClassifyAdapter()
        encoder.load(
            TierSpec(
                name=f"{tier.name} turn selector",
                path=str(folder),
                max_length=max_length,
                options=options,
            ),
            str(folder),
            device,
        )
        try:
            background = background_indices(list(encoder.model.config.id2label.values()), options)
        except ValueError as e:
            encoder.unload()
            raise ValueError(f"tier {tier.name}: turn_selector {folder.name}: {e}") from e
        return cls(encoder, encoder.reading, background, folder.name)

    def windows(self, messages: Sequence[Mapping[str, str]], max_chars: int) -> Windows:
        """One encoder window per user turn of `messages` (however short)."""
        return encode_windows(
            self.adapter.tokenizer,
            {"messages": [dict(m) for m in messages]},
            self.reading,
            max_chars=max_chars,
            split=True,
        )

    def select(self, batch: Sequence[Windows]) -> list[Pick]:
        """Each conversation's pick: the encoder over every turn window of the batch
        (one padded pass), each conversation's rows pooled by the tier's rule."""
        if not batch:
            return []
        rows = self.adapter.window_probs(list(batch))
        out: list[Pick] = []
        at = 0
        focus = [j for j in range(len(self.names)) if j not in self.background]
        for w in batch:
            mine = rows[at : at + len(w.ids)]
            at += len(w.ids)
            pooled = pool(mine, w.plan, self.reading.pooling, background=self.background)
            row = mine[pooled.deciding]
            best = max(focus or range(len(self.names)), key=row.__getitem__)
            margin = row[best] - max((row[b] for b in self.background), default=0.0)
            out.append(Pick(w, pooled, self.names[best], round(float(margin), 6)))
        return out

    def describe(self, pick: Selected) -> dict[str, Any]:
        """What the result records of the selection (output.reading.selector)."""
        return {
            "model": self.name,
            "turn": pick.turn,
            "label": pick.label,
            "margin": pick.margin,
            "turns_read": len(pick.windows.plan.windows),
        }

    def unload(self) -> None:
        """Drop the encoder."""
        self.adapter.unload()
