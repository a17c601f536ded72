"""The text a reviewer (and an embedding) sees for a stored item: what the model read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from config.taskconfig import TaskSpec
from db.engine import transaction
from db.sources import load_inputs
from workers.adapters.base import InputError
from workers.adapters.text import conversation_text


def item_texts(
    url: str, spec: TaskSpec, refs: Sequence[tuple[int, str, int]], *, max_chars: int
) -> dict[int, str]:
    """{item_id: text} for (item_id, source_kind, source_id) refs: a conversation's
    `role: content` lines as the encoder reads them, a transcript for a task that
    reads another task's transcript. An item whose text cannot be built gets
    "(unreadable: reason)", never a silent gap."""
    with transaction(url) as session:
        inputs = load_inputs(session, refs, text_from_task=spec.input_from)
    out: dict[int, str] = {}
    for item_id, _, _ in refs:
        if item_id not in inputs:
            out[item_id] = "(unreadable: the source row is gone)"
            continue
        data: dict[str, Any] = inputs[item_id][1]
        try:
            if "messages" in data or "text" in data:
                out[item_id] = conversation_text(data, max_chars=max_chars)
            else:
                out[item_id] = json.dumps(data)
        except InputError as e:
            out[item_id] = f"(unreadable: {e})"
    return out
