"""Turning a stored conversation into model text, with the checks that make a
malformed one fail clearly instead of crashing the batch."""

from __future__ import annotations

from typing import Any

from workers.adapters.base import InputError


def conversation_messages(data: dict[str, Any], *, max_chars: int) -> list[dict[str, str]]:
    """Validated messages of a conversation: a non-empty list of {role, content} strings."""
    if "text" in data:  # output of another task, e.g. a transcript
        text = data["text"]
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text to classify is empty")
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
    if not any(m["content"].strip() for m in out):
        raise InputError("conversation has only empty messages")
    return out


def conversation_text(data: dict[str, Any], *, max_chars: int) -> str:
    """One string for an encoder: `role: content` lines."""
    messages = conversation_messages(data, max_chars=max_chars)
    if len(messages) == 1 and "text" in data:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["content"].strip())
