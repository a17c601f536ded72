"""Turning a stored conversation into model text, with the checks that make a
malformed one fail clearly instead of crashing the batch."""

from __future__ import annotations

import unicodedata
from typing import Any

from workers.adapters.base import InputError

# Unicode general categories a reader cannot see: separators (Z*: spaces, line
# and paragraph separators), controls (Cc: BEL, NUL, ...), format characters
# (Cf: zero-width space/joiners, BOM, bidi marks, soft hyphen), surrogates,
# unassigned code points and private use (Cs, Cn, Co).
_INVISIBLE = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Cn", "Co"})


def is_blank(text: str) -> bool:
    """True when `text` holds nothing a reader could see: empty, whitespace, or
    only invisible characters (zero-width spaces, U+FEFF, control codes, ...).

    Such content is empty to a person, so the fleet fails it as empty instead
    of letting a model label nothing with confidence.
    """
    stripped = text.strip()
    if not stripped:
        return True
    if stripped[0].isalnum():  # the common case, decided without a per-character scan
        return False
    return all(unicodedata.category(ch) in _INVISIBLE for ch in stripped)


def conversation_messages(data: dict[str, Any], *, max_chars: int) -> list[dict[str, str]]:
    """Validated messages of a conversation: a non-empty list of {role, content} strings."""
    if "text" in data:  # output of another task, e.g. a transcript
        text = data["text"]
        if not isinstance(text, str) or is_blank(text):
            raise InputError(
                "the text to classify is empty (nothing but whitespace or invisible characters)"
            )
        if len(text) > max_chars:
            raise InputError(
                f"text is {len(text):,} characters; the limit is {max_chars:,} "
                "(raise FLEET_MAX_TEXT_CHARS or split the item)"
            )
        return [{"role": "user", "content": text}]
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InputError(
            f"conversation messages must be a list of {{role, content}} objects, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise InputError("conversation has no messages")
    total = 0
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InputError(
                f"message {i} is {type(msg).__name__}, expected an object with role and content"
            )
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise InputError(f"message {i} has no role (expected a string such as 'user')")
        if not isinstance(content, str):
            raise InputError(f"message {i} content must be a string, got {type(content).__name__}")
        total += len(content)
        if total > max_chars:
            raise InputError(
                f"conversation text exceeds {max_chars:,} characters "
                "(raise FLEET_MAX_TEXT_CHARS or split the conversation)"
            )
        out.append({"role": role, "content": content})
    if all(is_blank(m["content"]) for m in out):
        raise InputError(
            "conversation has only empty messages (nothing but whitespace or invisible "
            "characters such as zero-width spaces or control codes)"
        )
    return out


def conversation_text(data: dict[str, Any], *, max_chars: int) -> str:
    """One string for an encoder: `role: content` lines."""
    messages = conversation_messages(data, max_chars=max_chars)
    if len(messages) == 1 and "text" in data:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if not is_blank(m["content"]))
