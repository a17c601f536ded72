"""The interface every model adapter implements.

An adapter owns one loaded model (one tier of a task's ladder). The runtime
(`workers.runtime`) decides batching, OOM handling and tier changes; the
adapter only turns sources into model inputs and runs one sub-batch.

Kept free of torch at import time so the pure parts can be tested anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from config.taskconfig import TierSpec


class InputError(Exception):
    """The item itself is bad (malformed conversation, corrupt audio, ...).

    The message is recorded on the work item as its reason; the rest of the
    batch goes on. Write it so that a person knows what to fix.
    """


@dataclass(frozen=True)
class Source:
    """What the worker read from Postgres for one work item."""

    item_id: int
    kind: str  # "conversation" | "audio"
    external_id: str
    # conversation: {"messages": [...], "language": ...}; audio: {"uri": ..., "duration_s": ...};
    # a task over another task's output (e.g. intent of a transcript) gets {"text": ...}.
    data: dict[str, Any]


@dataclass
class Prepared:
    """A source turned into model input. `cost` is what the budget counts:
    tokens for text, centiseconds of audio for speech."""

    item_id: int
    cost: int
    payload: Any
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. {"truncated_tokens": 812}


@dataclass(frozen=True)
class Prediction:
    label: str | None
    confidence: float | None
    scores: dict[str, float] | None = None
    output: dict[str, Any] | None = None
    # Set when the model ran but its answer is unusable (e.g. invalid JSON after one
    # repair): the result row keeps `output` (raw text included) and the item is
    # marked failed with this reason. Never replace it with a default label.
    error: str | None = None


class Adapter(Protocol):
    """One model kind. Instances hold at most one loaded tier."""

    kind: str

    def load(self, tier: TierSpec, model_path: str, device: str) -> None: ...

    def unload(self) -> None: ...

    # Optional: `check(tier, model_path) -> None` raises ValueError when a tier's
    # folder holds a model this adapter cannot serve (wrong model type, labels that
    # are not the task's), reading config files only. The runtime calls it for every
    # tier before the first one loads, so the worker refuses to start (exit 2).

    def prepare(self, source: Source) -> Prepared:
        """Validate and encode one source; raise InputError with a clear reason."""
        ...

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """Run one sub-batch. May raise an out-of-memory error (the runtime handles it)."""
        ...
