"""What tests give the fleet: conversations, JSONL files, a task config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def tasks_toml(
    path: Path, tiers: Sequence[dict[str, Any]], *, task: str = "intent", extra: str = ""
) -> Path:
    lines = [
        "include_bundled = false",
        f"[tasks.{task}]",
        'kind = "sequence_classify"',
        'source = "conversation"',
    ]
    for t in tiers:
        lines.append(f"[[tasks.{task}.ladder]]")
        for k, v in t.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def conversations(n: int, *, prefix: str = "c", start: int = 0) -> list[dict[str, Any]]:
    words = [
        "report",
        "deadline",
        "friend",
        "course",
        "happy",
        "goal",
        "weather",
        "document",
        "anxious",
    ]
    out = []
    for i in range(start, start + n):
        k = 1 + (i * 7) % 40
        content = " ".join(words[(i + j) % len(words)] for j in range(k))
        out.append(
            {
                "external_id": f"{prefix}{i:06d}",
                "messages": [
                    {"role": "user", "content": f"message {i}: {content}"},
                    {"role": "assistant", "content": "ok"},
                ],
                "language": "en",
            }
        )
    return out


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
