"""Grouping failure reasons: what differs between items folded out of an error text."""

from __future__ import annotations

import re

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_FILE = re.compile(
    r"(?<![\w/])(?:[\w.-]+/)*[\w.-]+\.(?:wav|flac|ogg|mp3|m4a|opus|json|jsonl|txt)\b", re.I
)
_PATH = re.compile(r"(?<![\w])(?:/[\w.@+-]+){2,}/?")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")


def reason_key(error: str | None) -> str:
    """A failure reason without what differs between items (quoted values, file
    names, paths, ids, numbers), so errors of one kind group together."""
    if not error or not error.strip():
        return "(no reason recorded)"
    line = error.strip().splitlines()[0]
    line = _QUOTED.sub("\u2026", line)
    line = _UUID.sub("<id>", line)
    line = _PATH.sub("<path>", line)
    line = _FILE.sub("<file>", line)
    line = _NUMBER.sub("N", line)
    line = re.sub(r"\s+", " ", line).strip()
    return line if len(line) <= 160 else line[:159] + "\u2026"
