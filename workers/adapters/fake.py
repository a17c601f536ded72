"""A fake model that implements the real adapter interface, for tests and
benchmarks of everything around the model (ledger, queue, OOM policy).

It costs one token per word, labels by a stable hash of the text, and can be
made slow (`seconds_per_item`) to widen the window for crash tests. Combined
with `workers.simulate.MemorySimulator` it raises the real OOM error type.

With `gold` (a JSONL file of `{"external_id", "label"}` lines, the `fleet eval
--gold` format) it is an oracle instead: it answers each item's gold label at
confidence 1.0 and fails an item without one; `cost_per_item` is recorded in
each result's output (`cost`), the strong tier of a cascade benchmark.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.text import conversation_text

LABELS = ("alpha", "beta", "gamma", "delta")


class FakeAdapter:
    kind = "fake"

    def __init__(
        self,
        *,
        max_chars: int = 1_000_000,
        seconds_per_item: float = 0.0,
        gold: str | None = None,
        cost_per_item: float = 0.0,
    ) -> None:
        self.max_chars = max_chars
        self.seconds_per_item = seconds_per_item
        self.gold = read_gold(gold) if gold else None
        self.cost_per_item = cost_per_item
        self._answers: dict[int, str] = {}
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
        if self.gold is not None:
            if source.external_id not in self.gold:
                raise InputError(f"the oracle has no gold label for {source.external_id!r}")
            self._answers[source.item_id] = self.gold[source.external_id]
        return Prepared(source.item_id, min(len(words), self.max_length), text)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        if self.loaded is None:
            raise RuntimeError("predict before load")
        self.calls.append(len(batch))
        if self.seconds_per_item:
            time.sleep(self.seconds_per_item * len(batch))
        out: list[Prediction | InputError] = []
        for p in batch:
            if self.gold is not None:
                label = self._answers.pop(p.item_id)
                out.append(
                    Prediction(label, 1.0, {label: 1.0}, output={"cost": self.cost_per_item})
                )
                continue
            digest = hashlib.sha256(str(p.payload).encode()).digest()
            label = LABELS[digest[0] % len(LABELS)]
            out.append(Prediction(label, 0.5 + digest[1] / 512, {label: 0.5 + digest[1] / 512}))
        return out


def read_gold(path: str) -> dict[str, str]:
    """external_id -> label from a JSONL file; ValueError naming the line when one is bad."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "external_id" not in row or "label" not in row:
            raise ValueError(f"{path}:{n}: expected an object with external_id and label")
        out[str(row["external_id"])] = str(row["label"])
    return out


def fake_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds_per_item": float(options.get("seconds_per_item", 0.0)),
        "gold": options.get("gold"),
        "cost_per_item": float(options.get("cost_per_item", 0.0)),
    }
