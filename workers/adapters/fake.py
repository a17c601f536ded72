"""A fake model that implements the real adapter interface, for tests and
benchmarks of everything around the model (ledger, queue, OOM policy).

It costs one token per word, labels by a stable hash of the text, and can be
made slow (`seconds_per_item`) to widen the window for crash tests. Combined
with `workers.simulate.MemorySimulator` it raises the real OOM error type.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from fleet.config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.text import conversation_text

LABELS = ("alpha", "beta", "gamma", "delta")


class FakeAdapter:
    kind = "fake"

    def __init__(self, *, max_chars: int = 1_000_000, seconds_per_item: float = 0.0) -> None:
        self.max_chars = max_chars
        self.seconds_per_item = seconds_per_item
        self.loaded: str | None = None
        self.max_length = 512
        self.calls: list[int] = []  # sub-batch sizes, for tests

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        self.loaded = tier.name
        self.max_length = tier.max_length

    def unload(self) -> None:
        self.loaded = None

    def prepare(self, source: Source) -> Prepared:
        text = conversation_text(source.data, max_chars=self.max_chars)
        words = text.split()
        return Prepared(source.item_id, min(len(words), self.max_length), text)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        if self.loaded is None:
            raise RuntimeError("predict before load")
        self.calls.append(len(batch))
        if self.seconds_per_item:
            time.sleep(self.seconds_per_item * len(batch))
        out: list[Prediction | InputError] = []
        for p in batch:
            digest = hashlib.sha256(str(p.payload).encode()).digest()
            label = LABELS[digest[0] % len(LABELS)]
            out.append(Prediction(label, 0.5 + digest[1] / 512, {label: 0.5 + digest[1] / 512}))
        return out


def fake_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"seconds_per_item": float(options.get("seconds_per_item", 0.0))}
