"""Putting the backlog into Postgres: JSONL conversations and audio folders.

Idempotent on external_id among ingested rows (NULL source; a `fleet sync`
source's row with the same id is a different row). A bad line is reported with
its line number and skipped; every good line goes in. Files are streamed, never
loaded whole.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from db.engine import transaction
from db.sources import ingest_audio, ingest_conversations

CHUNK = 2000
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3"}


@dataclass
class IngestReport:
    read: int = 0
    inserted: int = 0
    already_present: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number or 0, reason)


# Column sizes in db/schema.py: a longer value would fail the whole chunk's insert.
MAX_EXTERNAL_ID = 256
MAX_LANGUAGE = 16
# A \uD800-\uDFFF escape: JSON allows it, UTF-8 (and so Postgres) cannot hold it unpaired.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_storable(obj: Any) -> None:
    """Postgres text and jsonb hold neither NUL characters nor unpaired surrogates."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError("contains a NUL character (\\u0000), which Postgres cannot store")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"contains an unpaired UTF-16 surrogate (\\u{ord(value[e.start]):04x}), "
                    "which is not valid Unicode; fix the producer of this file"
                ) from None


def parse_conversation_line(raw: bytes, lineno: int) -> dict[str, Any]:
    """One JSONL line -> a conversations row. Raises ValueError with the reason."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start})") from None
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte order mark some editors write
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        what = e.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise ValueError(f"not valid JSON ({what} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read; flatten it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    ext = obj.get("external_id", obj.get("id"))
    if not isinstance(ext, str | int) or isinstance(ext, bool) or str(ext) == "":
        raise ValueError("missing external_id (a string or integer)")
    if len(str(ext)) > MAX_EXTERNAL_ID:
        raise ValueError(
            f"external_id is {len(str(ext)):,} characters; at most {MAX_EXTERNAL_ID} are stored"
        )
    if "messages" not in obj:
        raise ValueError("missing messages (a list of {role, content})")
    if "\\u0000" in line or _SURROGATE_ESCAPE.search(line):
        _check_storable(obj)
    language = obj.get("language")
    if isinstance(language, str) and len(language) > MAX_LANGUAGE:
        raise ValueError(
            f"language is {len(language)} characters; use a language code such as 'en' "
            f"(at most {MAX_LANGUAGE})"
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    # Messages are stored as given: a malformed conversation is still ingested,
    # and the worker records exactly what is wrong with it on its work item.
    return {
        "external_id": str(ext),
        "messages": obj["messages"],
        "language": language if isinstance(language, str) else None,
        "meta": meta,
    }


def ingest_conversations_file(
    url: str, stream: BinaryIO, *, progress: Callable[[int], None] | None = None
) -> IngestReport:
    report = IngestReport()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def flush() -> None:
        if rows:
            with transaction(url) as session:
                n = ingest_conversations(session, rows)
            report.inserted += n
            report.already_present += len(rows) - n
            rows.clear()
            seen.clear()

    for lineno, raw in enumerate(stream, start=1):
        if progress:
            progress(len(raw))
        if not raw.strip():
            continue
        report.read += 1
        try:
            row = parse_conversation_line(raw, lineno)
        except ValueError as e:
            report.bad.append((lineno, str(e)))
            continue
        if row["external_id"] in seen:  # same id twice in one chunk: first wins
            report.already_present += 1
            continue
        seen.add(row["external_id"])
        rows.append(row)
        if len(rows) >= CHUNK:
            flush()
    flush()
    return report


def iter_audio_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and (path.is_file() or path.is_symlink()):
            yield path


def _unstorable_path(rel: str) -> str | None:
    """Why a file's relative path cannot be its external_id, if it cannot."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        return f"{shown}: the file name is not valid UTF-8; rename the file"
    if len(rel) > MAX_EXTERNAL_ID:
        return (
            f"{rel[:60]}...: the path under the audio root is {len(rel)} characters; "
            f"at most {MAX_EXTERNAL_ID} are stored (shorten the folder or file names)"
        )
    return None


def ingest_audio_dir(
    url: str, folder: Path, *, audio_root: Path, progress: Callable[[int], None] | None = None
) -> IngestReport:
    """Register the audio files under `folder` (which must be inside the audio root).

    The uri is the path relative to the root; files are not read beyond their
    header here. A file that is not valid audio is still registered: the
    transcription worker records exactly why it cannot be used.
    """
    import soundfile

    root = audio_root.resolve()
    base = folder.resolve()
    if not base.is_relative_to(root):
        raise ValueError(
            f"{folder} is not inside the audio root {root}: move the files there or set "
            "FLEET_AUDIO_ROOT to a folder that contains them"
        )
    report = IngestReport()
    rows: list[dict[str, Any]] = []
    for path in iter_audio_files(folder):
        report.read += 1
        rel = str(base.relative_to(root) / path.relative_to(folder))
        problem = _unstorable_path(rel)
        if problem:
            report.bad.append((0, problem))
            continue
        try:
            duration: float | None = float(soundfile.info(str(path)).duration)
        except Exception:
            duration = None
        if duration is not None and not (math.isfinite(duration) and duration >= 0):
            duration = None  # a nonsense header: the worker says what is wrong
        rows.append({"external_id": rel, "uri": rel, "duration_s": duration, "meta": {}})
        if progress:
            progress(1)
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i : i + CHUNK]
        with transaction(url) as session:
            n = ingest_audio(session, chunk)
        report.inserted += n
        report.already_present += len(chunk) - n
    return report
