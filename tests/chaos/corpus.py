"""The bad-input corpus: (name, payload, expected outcome) cases.

Conversation cases are JSONL lines. Audio cases build a file under the audio
folder (or, for uris no folder scan can produce, a row that another system
wrote straight into `audio_files`). The expected outcome is one of

    Expect.ingest(reason)  `fleet ingest` reports the line/file as bad with this reason
    Expect.failed(reason)  ingested; the worker fails the item, last_error has this reason
    Expect.done()          odd but valid: the item is done
    Expect.skipped()       not an item at all (ingest ignores it, nothing is reported)

Reasons are matched as case-insensitive substrings.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Expect:
    outcome: str  # ingest | failed | done | skipped
    reason: str = ""

    @classmethod
    def ingest(cls, reason: str) -> Expect:
        return cls("ingest", reason)

    @classmethod
    def failed(cls, reason: str) -> Expect:
        return cls("failed", reason)

    @classmethod
    def done(cls) -> Expect:
        return cls("done")

    @classmethod
    def skipped(cls) -> Expect:
        return cls("skipped")


# -- conversations ---------------------------------------------------------------------


def _line(ext: str, messages: object, **extra: object) -> bytes:
    return json.dumps({"external_id": ext, "messages": messages, **extra}).encode()


def _user(content: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": content}]


def _deep(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


CONVERSATIONS: list[tuple[str, bytes, Expect]] = [
    # rejected by `fleet ingest`, with the line number and reason
    (
        "invalid-utf8",
        b'{"external_id": "invalid-utf8", "messages": "\xff\xfe\xc3"}',
        Expect.ingest("not valid UTF-8"),
    ),
    (
        "lone-surrogate",
        _line("lone-surrogate", _user("x")).replace(b'"x"', b'"a \\ud800 b"'),
        Expect.ingest("unpaired UTF-16 surrogate"),
    ),
    (
        "lone-low-surrogate-id",
        b'{"external_id": "\\udc00", "messages": []}',
        Expect.ingest("unpaired UTF-16 surrogate"),
    ),
    ("nul-escape", _line("nul-escape", _user("a\u0000b")), Expect.ingest("NUL character")),
    (
        "raw-nul-byte",
        b'{"external_id": "raw-nul-byte", "messages": [{"role": "user", "content": "a\x00b"}]}',
        Expect.ingest("not valid JSON"),
    ),
    (
        "truncated-json",
        b'{"external_id": "truncated-json", "messages": [{"role": "us',
        Expect.ingest("not valid JSON"),
    ),
    (
        "top-level-array",
        b'[{"external_id": "top-level-array"}]',
        Expect.ingest("expected a JSON object, got list"),
    ),
    ("top-level-string", b'"just a string"', Expect.ingest("expected a JSON object, got str")),
    ("top-level-number", b"12345", Expect.ingest("expected a JSON object, got int")),
    ("empty-object", b"{}", Expect.ingest("missing external_id")),
    (
        "external-id-null",
        b'{"external_id": null, "messages": []}',
        Expect.ingest("missing external_id"),
    ),
    (
        "external-id-bool",
        b'{"external_id": true, "messages": []}',
        Expect.ingest("missing external_id"),
    ),
    (
        "external-id-list",
        b'{"external_id": ["a"], "messages": []}',
        Expect.ingest("missing external_id"),
    ),
    ("external-id-too-long", _line("x" * 300, _user("hi")), Expect.ingest("at most 256")),
    (
        "missing-messages",
        b'{"external_id": "missing-messages", "text": "hi"}',
        Expect.ingest("missing messages"),
    ),
    (
        "language-not-a-code",
        _line("language-not-a-code", _user("hi"), language="English (United Kingdom)"),
        Expect.ingest("language"),
    ),
    (
        "nested-100k-deep",
        b'{"external_id": "nested-100k-deep", "messages": ' + _deep(100_000).encode() + b"}",
        Expect.ingest("nested too deeply"),
    ),
    # stored as given; the worker fails the item with what is wrong
    ("messages-string", _line("messages-string", "hello there"), Expect.failed("must be a list")),
    ("messages-null", _line("messages-null", None), Expect.failed("got NoneType")),
    ("messages-number", _line("messages-number", 42), Expect.failed("got int")),
    (
        "messages-object",
        _line("messages-object", {"role": "user", "content": "hi"}),
        Expect.failed("got dict"),
    ),
    ("messages-empty", _line("messages-empty", []), Expect.failed("has no messages")),
    ("message-is-string", _line("message-is-string", ["hello"]), Expect.failed("message 0 is str")),
    ("message-is-null", _line("message-is-null", [None]), Expect.failed("message 0 is NoneType")),
    (
        "nested-garbage",
        b'{"external_id": "nested-garbage", "messages": ' + _deep(500).encode() + b"}",
        Expect.failed("message 0 is list"),
    ),
    ("role-missing", _line("role-missing", [{"content": "hi"}]), Expect.failed("has no role")),
    (
        "role-empty",
        _line("role-empty", [{"role": "", "content": "hi"}]),
        Expect.failed("has no role"),
    ),
    (
        "role-number",
        _line("role-number", [{"role": 7, "content": "hi"}]),
        Expect.failed("has no role"),
    ),
    (
        "content-missing",
        _line("content-missing", [{"role": "user"}]),
        Expect.failed("content must be a string, got NoneType"),
    ),
    ("content-number", _line("content-number", _user(3.14)), Expect.failed("got float")),
    (
        "content-list",
        _line("content-list", _user([{"type": "text", "text": "hi"}])),
        Expect.failed("got list"),
    ),
    (
        "content-object",
        _line("content-object", _user({"a": {"b": [1, {"c": None}]}})),
        Expect.failed("got dict"),
    ),
    ("content-empty", _line("content-empty", _user("")), Expect.failed("only empty messages")),
    (
        "content-whitespace",
        _line("content-whitespace", _user("  \n\t \r ")),
        Expect.failed("only empty messages"),
    ),
    (
        "content-unicode-spaces",
        _line("content-unicode-spaces", _user("\u00a0\u2003\u3000")),
        Expect.failed("only empty messages"),
    ),
    (
        "content-zero-width",
        _line("content-zero-width", _user("\u200b\u200b\ufeff\u2060")),
        Expect.failed("only empty messages"),
    ),
    (
        "content-control-codes",
        _line("content-control-codes", _user("\u0007\u0007\u001b\u0008")),
        Expect.failed("only empty messages"),
    ),
    (
        "huge-one-message",
        _line("huge-one-message", _user("word " * 240_000)),
        Expect.failed("exceeds 1,000,000 characters"),
    ),
    (
        "huge-many-messages",
        _line("huge-many-messages", _user("y" * 600) * 2000),
        Expect.failed("exceeds 1,000,000 characters"),
    ),
    # odd but valid: done
    ("one-200k-char-token", _line("one-200k-char-token", _user("a" * 200_000)), Expect.done()),
    (
        "control-chars",
        _line("control-chars", _user("\x01\x07\x1b[31mred\x1b[0m\x7f ok")),
        Expect.done(),
    ),
    (
        "emoji-rtl-combining",
        _line("emoji-rtl-combining", _user("\U0001f600 \u05e9\u05dc\u05d5\u05dd e\u0301\u200b")),
        Expect.done(),
    ),
    (
        "escaped-backslash-u0000",
        _line("escaped-backslash-u0000", _user("literal \\u0000 text")),
        Expect.done(),
    ),
    (
        "10k-tiny-messages",
        _line("10k-tiny-messages", [{"role": "user", "content": "ok"}] * 10_000),
        Expect.done(),
    ),
    (
        "extra-fields",
        _line(
            "extra-fields",
            [{"role": "user", "content": "hi", "ts": 1, "x": [1]}],
            meta="not an object",
            language=5,
        ),
        Expect.done(),
    ),
    (
        "integer-id",
        b'{"id": 90210, "messages": [{"role": "user", "content": "numeric id"}]}',
        Expect.done(),
    ),
    # not items
    ("blank-line", b"   \t ", Expect.skipped()),
]


def conversation_ext(name: str) -> str:
    """The external_id a stored conversation case has."""
    if name == "integer-id":
        return "90210"
    return name


# -- audio -----------------------------------------------------------------------------

SR = 16_000


def wav_bytes(
    samples: bytes,
    *,
    rate: int = SR,
    channels: int = 1,
    bits: int = 16,
    fmt: int = 1,
    declared: int | None = None,
    wave: bytes = b"WAVE",
) -> bytes:
    """A RIFF/WAVE file built by hand, so every header field can be wrong on purpose."""
    block = channels * bits // 8
    fmt_chunk = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, fmt, channels, rate, rate * block, block, bits
    )
    data = struct.pack("<4sI", b"data", len(samples) if declared is None else declared) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(fmt_chunk) + len(data)) + wave + fmt_chunk + data


def tone(seconds: float = 1.0, *, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass(frozen=True)
class Made:
    """What an audio case made: a file under the folder (its name, None if
    ingest must not register it) or a row's uri for `audio_files`."""

    file: str | None = None
    row_uri: str | None = None


Maker = Callable[[Path, Path], Made]  # (folder inside the audio root, a file outside it)


def _write(name: str, data: bytes) -> Maker:
    def make(folder: Path, outside: Path) -> Made:
        (folder / name).write_bytes(data)
        return Made(file=name)

    return make


def _stereo(folder: Path, outside: Path) -> Made:
    both = np.stack([tone(), tone(freq=660.0)], axis=1)
    (folder / "stereo.wav").write_bytes(wav_bytes(pcm16(both), channels=2))
    return Made(file="stereo.wav")


def _unreadable(folder: Path, outside: Path) -> Made:
    path = folder / "unreadable.wav"
    path.write_bytes(wav_bytes(pcm16(tone())))
    path.chmod(0)
    return Made(file="unreadable.wav")


def _symlink_out(folder: Path, outside: Path) -> Made:
    (folder / "escape.wav").symlink_to(outside)
    return Made(file="escape.wav")


def _directory(folder: Path, outside: Path) -> Made:
    (folder / "folder.wav").mkdir()
    (folder / "folder.wav" / "inner.txt").write_text("not audio")
    return Made()


def _row(uri: str) -> Maker:
    """A uri no folder scan produces, as another system might write it."""

    def make(folder: Path, outside: Path) -> Made:
        return Made(row_uri=uri.format(folder=folder.name, outside=outside))

    return make


def _bad_name(folder: Path, outside: Path) -> Made:
    with open(os.path.join(os.fsencode(folder), b"latin1-\xe9.wav"), "wb") as f:
        f.write(wav_bytes(pcm16(tone())))
    return Made()


def _long_path(folder: Path, outside: Path) -> Made:
    deep = folder / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "long.wav").write_bytes(wav_bytes(pcm16(tone())))
    return Made()


_GOOD = wav_bytes(pcm16(tone()))
_NAN = np.full(SR // 2, np.nan, dtype="<f4").tobytes()
_INF = np.concatenate([tone(0.5), [np.inf]]).astype("<f4").tobytes()
_NOISE = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
_UINT8 = ((tone() + 1) * 127.5).astype(np.uint8).tobytes()
_F32_44K = tone(rate=44_100).astype("<f4").tobytes()
_ROOT = os.geteuid() == 0  # root reads a chmod 000 file anyway: then it is simply done

AUDIO: list[tuple[str, Maker, Expect]] = [
    ("zero-length", _write("zero-length.wav", b""), Expect.failed("empty (0 bytes)")),
    ("truncated", _write("truncated.wav", _GOOD[: len(_GOOD) // 3]), Expect.failed("truncated")),
    ("header-only", _write("header-only.wav", wav_bytes(b"")), Expect.failed("no audio samples")),
    (
        "wrong-riff-type",
        _write("wrong-riff-type.wav", wav_bytes(pcm16(tone()), wave=b"WAVX")),
        Expect.failed("not in a recognised audio format"),
    ),
    (
        "text-named-wav",
        _write("text-named-wav.wav", b"hello, this is not audio at all\n" * 20),
        Expect.failed("looks like a text file"),
    ),
    (
        "png-named-wav",
        _write("png-named-wav.wav", b"\x89PNG\r\n\x1a\n" + bytes(200)),
        Expect.failed("PNG image"),
    ),
    (
        "gzip-named-wav",
        _write("gzip-named-wav.wav", b"\x1f\x8b\x08\x00" + bytes(200)),
        Expect.failed("gzip"),
    ),
    (
        "mp4-named-wav",
        _write("mp4-named-wav.wav", b"\x00\x00\x00\x20ftypM4A " + bytes(200)),
        Expect.failed("MP4"),
    ),
    (
        "random-bytes",
        _write("random-bytes.wav", _NOISE),
        Expect.failed("not in a recognised audio format"),
    ),
    (
        "huge-sample-rate",
        _write("huge-sample-rate.wav", wav_bytes(pcm16(tone()), rate=1_000_000)),
        Expect.failed("sample rate of 1000000 Hz"),
    ),
    (
        "tiny-sample-rate",
        _write("tiny-sample-rate.wav", wav_bytes(pcm16(tone(rate=100)), rate=100)),
        Expect.failed("sample rate of 100 Hz"),
    ),
    (
        "sixteen-channels",
        _write("sixteen-channels.wav", wav_bytes(pcm16(np.repeat(tone(0.2), 16)), channels=16)),
        Expect.failed("16 channels"),
    ),
    (
        "nan-samples",
        _write("nan-samples.wav", wav_bytes(_NAN, bits=32, fmt=3)),
        Expect.failed("NaN or infinite"),
    ),
    (
        "inf-sample",
        _write("inf-sample.wav", wav_bytes(_INF, bits=32, fmt=3)),
        Expect.failed("NaN or infinite"),
    ),
    ("symlink-escape", _symlink_out, Expect.failed("outside the audio root")),
    ("missing-file", _row("{folder}/never-written.wav"), Expect.failed("not found")),
    ("dotdot-uri", _row("{folder}/../../secret.wav"), Expect.failed("outside the audio root")),
    ("absolute-outside", _row("{outside}"), Expect.failed("outside the audio root")),
    ("directory-uri", _row("{folder}/folder.wav"), Expect.failed("is a directory")),
    (
        "https-uri",
        _row("https://example.com/a.wav"),
        Expect.failed("scheme 'https' is not supported"),
    ),
    ("remote-file-uri", _row("file://fileserver/share/a.wav"), Expect.failed("names host")),
    ("empty-uri", _row(""), Expect.failed("uri is empty")),
    ("whitespace-uri", _row("   "), Expect.failed("uri is empty")),
    ("directory-named-wav", _directory, Expect.skipped()),  # a folder scan only takes files
    ("non-utf8-name", _bad_name, Expect.ingest("not valid UTF-8")),
    ("path-too-long", _long_path, Expect.ingest("at most 256")),
    ("unreadable", _unreadable, Expect.done() if _ROOT else Expect.failed("permission denied")),
    # odd but valid
    ("stereo", _stereo, Expect.done()),
    ("8-bit-unsigned", _write("8-bit-unsigned.wav", wav_bytes(_UINT8, bits=8)), Expect.done()),
    (
        "float32-44k",
        _write("float32-44k.wav", wav_bytes(_F32_44K, rate=44_100, bits=32, fmt=3)),
        Expect.done(),
    ),
    ("digital-silence", _write("digital-silence.wav", wav_bytes(bytes(SR * 2))), Expect.done()),
    ("one-sample", _write("one-sample.wav", wav_bytes(pcm16(tone(1 / SR)))), Expect.done()),
]
