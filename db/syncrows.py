"""From source rows to records, and what is wrong with a row (pure functions).

db.sync streams a source ordered by external_id (shape "messages": then by
position), so every row of one external_id arrives together. Each group of rows
becomes one record, a dict

    external_id, messages | uri + duration_s, language, updated_at,
    notes    what was taken differently from the source, in words (stored anyway)
    refused  why the record is not stored at all (None: it is stored)

and every note or refusal names the application's own key (and position). The
decisions, in the order they are taken:

    a repeat        the same external_id twice (shape "conversation"), or the
                    same (external_id, position) twice (shape "messages"):
                    identical copies are one row with a note; copies that differ
                    refuse the record (a join that repeats rows is never folded in)
    messages        NULL, JSON null or not a list of objects: refused
    NULL content    a message whose content is NULL is skipped, with a note
    NULL cursor     updated_at NULL: stored, with a note (such rows are read on
                    every pass: nothing else can tell when they change)
    unstorable      no external_id, one longer than 256 characters, a language
                    longer than 16, a NUL character or a lone surrogate: refused

This module imports nothing from the project but config/.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from config.taskconfig import SourceSpec

MAX_EXTERNAL_ID = 256  # conversations.external_id is String(256)
MAX_LANGUAGE = 16
CURSOR = "fleet_sync_cursor"  # updated_at AS timestamptz, in the source session's zone
NULL_CURSOR = (
    "updated_at is NULL: the row is read on every pass until it has one "
    "(set it on INSERT too, e.g. `updated_at timestamptz NOT NULL DEFAULT now()`)"
)


def content_hash(record: dict[str, Any], kind: str) -> str:
    """Hex blake2b (128 bits) of the content that classification reads (its
    canonical JSON: sorted keys, no spaces). Raises ValueError, with the reason,
    for content Postgres cannot store (a NUL character, an unpaired surrogate)."""
    if kind == "conversation":
        body: Any = [record["messages"], record.get("language")]
    else:
        body = [record["uri"], record.get("duration_s")]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    if "\\u0000" in raw or "\x00" in raw:
        raise ValueError("content holds a NUL character (\\u0000), which Postgres cannot store")
    try:
        data = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "content holds an unpaired UTF-16 surrogate, which is not valid Unicode"
        ) from None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cursor_of(row: dict[str, Any]) -> dt.datetime | None:
    """The row's updated_at as an aware time (Postgres converted it: see db.sync)."""
    value = row.get(CURSOR, row.get("updated_at"))
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return None


def groups(chunks: Iterable[Sequence[dict[str, Any]]]) -> Iterator[list[list[dict[str, Any]]]]:
    """Chunks of rows (ordered by external_id) -> chunks of groups, one group per
    external_id; a group that straddles two chunks is carried into the next."""
    carry: list[dict[str, Any]] = []
    for part in chunks:
        out: list[list[dict[str, Any]]] = []
        for row in part:
            if carry and row["external_id"] != carry[0]["external_id"]:
                out.append(carry)
                carry = []
            carry.append(row)
        if out:
            yield out
    if carry:
        yield [carry]


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def _messages(value: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """A conversation-shape messages value -> (messages, why it is refused)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return None, "messages is not JSON; expected a list of {role, content} objects"
    if value is None:
        return None, "messages is NULL; expected a list of {role, content} objects"
    if not isinstance(value, list):
        return None, f"messages is a JSON {type(value).__name__}, not a list of {{role, content}}"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"message {i} is a JSON {type(m).__name__}, not a {{role, content}} object"
    return value, None


def _drop_null_content(messages: list[dict[str, Any]], where: Sequence[Any]) -> list[str]:
    return [
        f"{w} has NULL content: skipped"
        for m, w in zip(messages, where, strict=True)
        if m.get("content") is None
    ]


def build(rows: Sequence[dict[str, Any]], spec: SourceSpec) -> dict[str, Any]:
    """One group of rows (one external_id) -> one record (see the module docstring)."""
    first = rows[0]
    notes: list[str] = []
    refused: str | None = None
    stamps = [cursor_of(r) for r in rows]
    rec: dict[str, Any] = {"external_id": first["external_id"], "notes": notes}
    if first["external_id"] is None or str(first["external_id"]) == "":
        many = f" ({len(rows)} such rows)" if len(rows) > 1 else ""
        return rec | {"refused": f"no external_id{many}", "updated_at": None}
    if any(s is None for s in stamps):
        notes.append(NULL_CURSOR)
    known = [s for s in stamps if s is not None]
    rec["updated_at"] = max(known) if known else None
    if spec.kind == "conversation" and spec.shape == "messages":
        by_position: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            by_position.setdefault(r["position"], []).append(r)
        messages: list[dict[str, Any]] = []
        for position, same in by_position.items():
            variants = {(r["role"], r["content"]) for r in same}
            if len(variants) > 1:
                refused = (
                    f"position {position} appears {_times(len(same))} with different content "
                    "(a join that repeats rows?); not stored, a stored copy keeps its content"
                )
            elif len(same) > 1:
                notes.append(f"position {position} appears {_times(len(same))}: one kept")
            if same[0]["content"] is None:
                notes.append(f"position {position} has NULL content: skipped")
                continue
            messages.append({"role": same[0]["role"], "content": same[0]["content"]})
        rec["messages"] = messages
        rec["language"] = next((r.get("language") for r in rows if r.get("language")), None)
    else:
        # Repeats are rare: a single row is not serialized to be compared.
        contents = (
            {json.dumps(_content(r, spec), sort_keys=True, default=str) for r in rows}
            if len(rows) > 1
            else ()
        )
        if len(contents) > 1:
            refused = (
                f"the source returned {len(rows)} different rows with this external_id; "
                "not stored, a stored copy keeps its content"
            )
        elif len(rows) > 1:
            notes.append(f"the source returned this row {_times(len(rows))}: one kept")
        rec |= _content(first, spec)
        if spec.kind == "conversation" and refused is None:
            messages_or_none, why = _messages(first["messages"])
            refused = why
            if messages_or_none is not None:
                notes += _drop_null_content(
                    messages_or_none, [f"message {i}" for i in range(len(messages_or_none))]
                )
                rec["messages"] = [m for m in messages_or_none if m.get("content") is not None]
    rec["refused"] = refused or storable(rec, spec)
    return rec


def _content(row: dict[str, Any], spec: SourceSpec) -> dict[str, Any]:
    if spec.kind == "audio":
        return {"uri": row["uri"], "duration_s": row.get("duration_s")}
    return {"messages": row["messages"], "language": row.get("language")}


def storable(rec: dict[str, Any], spec: SourceSpec) -> str | None:
    """Why a record cannot be stored at all (None: it can); sets rec["hash"]."""
    ext = rec["external_id"]
    if ext is None or str(ext) == "":
        return "no external_id"
    if printable(str(ext)) != str(ext):
        return "external_id holds a NUL character or an unpaired surrogate"
    if len(str(ext)) > MAX_EXTERNAL_ID:
        return f"external_id is {len(str(ext)):,} characters; at most {MAX_EXTERNAL_ID} are stored"
    lang = rec.get("language")
    if isinstance(lang, str) and len(lang) > MAX_LANGUAGE:
        return f"language {lang[:20]!r} is longer than {MAX_LANGUAGE} characters; use a code such as 'en'"
    try:
        rec["hash"] = content_hash(rec, spec.kind)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def printable(value: str) -> str:
    """`value` as Postgres text can hold it: NUL and unpaired surrogates escaped."""
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
