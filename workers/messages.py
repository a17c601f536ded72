"""The one message the fleet sends: small, JSON, ids only."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class BatchMessage:
    task: str
    batch_id: str
    item_ids: tuple[int, ...]
    attempt: int = 0

    def encode(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "batch_id": self.batch_id,
            "item_ids": list(self.item_ids),
            "attempt": self.attempt,
        }

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> BatchMessage:
        try:
            task, batch_id, ids = raw["task"], raw["batch_id"], raw["item_ids"]
        except KeyError as e:
            raise ValueError(f"batch message lacks {e.args[0]!r}: {sorted(raw)}") from None
        if not isinstance(task, str) or not isinstance(batch_id, str):
            raise ValueError("batch message task and batch_id must be strings")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError("batch message item_ids must be a list of integers")
        return cls(task, batch_id, tuple(ids), int(raw.get("attempt", 0)))

    def next_attempt(self) -> BatchMessage:
        return replace(self, attempt=self.attempt + 1)


def send_batch(app: Any, msg: BatchMessage, *, producer: Any = None) -> None:
    """Send one batch to its task's queue, by task name (no worker code imported).

    Pass a pooled `producer` when sending many, to reuse one connection."""
    app.send_task(
        "fleet.run_batch", kwargs=msg.encode(), queue=f"fleet.{msg.task}", producer=producer
    )
