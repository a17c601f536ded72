"""Finding and decoding the audio of a work item (the voice gate and the chunking
are workers.adapters.voice).

Kept free of torch so it can be tested (and run in prepare) anywhere. Every
problem that is the file's fault becomes an `InputError` whose message says
what is wrong and what to do; the rest of the batch goes on.

Decoding uses soundfile's bundled libsndfile (WAV, FLAC, OGG Vorbis/Opus and
MP3 from libsndfile 1.1 on); resampling uses scipy's polyphase filter, run in
blocks so a 4-hour file never needs more than its 16 kHz mono copy in memory.

Headers that lie are refused before libsndfile guesses: a PCM WAV claiming a
sample size it cannot have (7 bits) would be read as 8-bit noise. Channels
that cancel when mixed (one the inverse of the other) are caught while mixing
and one channel is used instead.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from workers.adapters.base import InputError

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 8
SUPPORTED = "WAV, FLAC, OGG (Vorbis/Opus) or MP3"
_READ_BLOCK_S = 30.0  # decode this much at a time
# WAV sample formats libsndfile really decodes: (format tag, container bits per sample).
_WAV_PCM, _WAV_FLOAT, _WAV_EXTENSIBLE = 1, 3, 0xFFFE
_WAV_BITS = {_WAV_PCM: (8, 16, 24, 32), _WAV_FLOAT: (32, 64)}
# A mix this much quieter than its loudest channel means the channels cancel.
CANCEL_RATIO = 0.1  # -20 dB


# ----------------------------------------------------------------------------- paths


def resolve_audio_path(root: Path, uri: str) -> Path:
    """The real path of `uri` inside the audio root.

    `uri` is relative to `root`, an absolute path inside it, or a file:// URI
    to one. Anything that would leave the root (`..`, symlinks pointing out)
    is refused: items come from a database that other systems write to.
    """
    root = Path(root)
    if not root.is_dir():
        # A deployment problem, not the item's: don't fail items for it.
        raise FileNotFoundError(f"audio root {root} does not exist or is not a directory")
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("audio uri is empty: set data.uri to a path relative to the audio root")
    raw = uri.strip()
    if "\x00" in raw:
        raise InputError("audio uri contains a NUL byte")
    if "://" in raw or raw.startswith("file:"):
        parts = urlsplit(raw)
        if parts.scheme != "file":
            raise InputError(
                f"audio uri scheme {parts.scheme!r} is not supported: copy the file under the "
                f"audio root and give its relative path (or a file:// URI)"
            )
        if parts.netloc not in ("", "localhost"):
            raise InputError(
                f"file:// uri names host {parts.netloc!r}; only local files are readable"
            )
        raw = unquote(parts.path)
        if not raw:
            raise InputError("file:// uri has no path")

    root_abs = Path(os.path.abspath(root))
    candidate = Path(os.path.normpath(root_abs / raw))  # an absolute `raw` replaces root_abs
    if not candidate.is_relative_to(root_abs):
        raise InputError(
            f"audio uri {uri!r} points outside the audio root {root_abs} "
            "(use a path relative to the root, without '..')"
        )
    real_root = Path(os.path.realpath(root_abs))
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        raise InputError(
            f"audio uri {uri!r} resolves through a symlink to {real}, outside the audio root "
            f"{real_root}; copy the file under the root instead of linking to it"
        )
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise InputError(f"audio file not found: {uri!r} (looked for {candidate})") from None
    except OSError as e:
        raise InputError(f"cannot access audio file {uri!r}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"audio uri {uri!r} is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"audio uri {uri!r} is not a regular file (a pipe, socket or device?)")
    return real


# ----------------------------------------------------------------------------- decoding

_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM file (convert it to a supported format)"),
]


def _sniff(path: Path) -> str | None:
    """A human name for what a non-audio file looks like, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "an MP4/M4A/AAC file (not supported: convert it to WAV, FLAC, OGG or MP3)"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file"
    return None


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) data bytes when a RIFF/WAVE file was cut short.

    libsndfile silently shortens such files; a truncated upload should fail
    loudly instead of yielding half a transcript.
    """
    found = _wav_chunk(path, b"data", 0)
    if found is None:
        return None
    pos, chunk_size, _ = found
    present = path.stat().st_size - pos - 8
    # 0 and 0xFFFFFFFF are written by streaming recorders that never patch the header.
    if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > present:
        return chunk_size, present
    return None


def _wav_chunk(path: Path, want: bytes, read: int) -> tuple[int, int, bytes] | None:
    """The first RIFF/WAVE chunk `want` (4 bytes, e.g. b"data"): (offset of its
    header, declared size, its first min(`read`, size) bytes), or None when the
    file is not RIFF/WAVE or has no such chunk before its end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == want:
                return pos, chunk_size, f.read(min(chunk_size, read))
            pos += 8 + chunk_size + (chunk_size & 1)
    return None


def _wav_format_problem(path: Path) -> str | None:
    """Why a RIFF/WAVE header's sample format cannot be decoded faithfully, or None.

    libsndfile accepts a PCM header claiming, say, 7 bits per sample and reads
    the data as 8-bit samples: noise with a wrong duration, which Whisper then
    "transcribes". Only the container sizes the format defines are accepted
    (PCM 8/16/24/32, float 32/64; WAVE_FORMAT_EXTENSIBLE the same, with fewer
    valid bits allowed inside the container). Other codecs (mu-law, ADPCM, ...)
    are left to libsndfile.
    """
    found = _wav_chunk(path, b"fmt ", 40)
    if found is None:
        return None
    fmt = found[2]
    if len(fmt) < 16:
        return "its WAV format chunk is cut short (a corrupt or truncated header; re-export it)"
    tag, channels, _rate, _bytes_per_s, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    container = tag
    if tag == _WAV_EXTENSIBLE:
        if len(fmt) < 40:
            return "its WAVE_FORMAT_EXTENSIBLE header is too short"
        container = struct.unpack("<H", fmt[24:26])[0]  # first two bytes of the sub-format GUID
    allowed = _WAV_BITS.get(container)
    if allowed is None:
        return None
    kind = "PCM" if container == _WAV_PCM else "float"
    if bits not in allowed:
        return (
            f"its header declares {bits}-bit {kind} samples; supported {kind} sample sizes are "
            f"{', '.join(map(str, allowed))} bits (re-export it, e.g. as 16-bit PCM)"
        )
    if channels and block_align != channels * bits // 8:
        return (
            f"its header is inconsistent: {channels} channel(s) of {bits}-bit samples need "
            f"{channels * bits // 8} bytes per frame, the header says {block_align} (re-export it)"
        )
    return None


def _check_wav_header(path: Path, name: str) -> None:
    """Refuse a WAV whose header lies about its sample format or its length."""
    problem = _wav_format_problem(path)
    if problem:
        raise InputError(f"{name} cannot be decoded faithfully: {problem}")
    shortfall = _wav_shortfall(path)
    if shortfall:
        declared, present = shortfall
        raise InputError(
            f"{name} is truncated: its header declares {declared:,} bytes of audio but only "
            f"{present:,} are present; upload the complete file"
        )


def _open(path: Path) -> sf.SoundFile:
    """Open with libsndfile, turning its errors into actionable InputErrors."""
    name = path.name
    try:
        return sf.SoundFile(path)
    except sf.LibsndfileError as e:
        what = _sniff(path)
        if what:
            raise InputError(
                f"{name} is not a supported audio file: it looks like {what}"
            ) from None
        msg = str(e.error_string if hasattr(e, "error_string") else e)
        # libsndfile says "does not exist" when its MP3 probe fails on garbage; we know it exists.
        if "not recognised" in msg.lower() or "does not exist" in msg.lower():
            raise InputError(
                f"{name} is not in a recognised audio format (expected {SUPPORTED})"
            ) from None
        raise InputError(
            f"{name} is corrupt or truncated and cannot be opened ({msg}); re-export or re-upload it"
        ) from None
    except (RuntimeError, OSError, ValueError) as e:
        raise InputError(f"cannot open {name} as audio: {e}") from None


class _StreamResampler:
    """Polyphase resampling in blocks, equal to one `resample_poly` over the whole
    signal (same filter, same zero padding at the ends) but with bounded memory.

    Each block [a, b) (a a multiple of `down`) is filtered with `pad` input
    samples of context on both sides, longer than the filter's half-length, so
    its interior output does not depend on where the block was cut.
    """

    def __init__(self, sr_in: int, sr_out: int) -> None:
        g = math.gcd(sr_in, sr_out)
        self.up, self.down = sr_out // g, sr_in // g
        half_len = 10 * max(self.up, self.down)  # resample_poly's default filter
        ctx = half_len // self.up + 2
        self.pad = self.down * -(-ctx // self.down)  # context, a multiple of down
        self.block = self.down * max(1, (1 << 18) // self.down)
        self.buf = np.zeros(0, dtype=np.float32)
        self.start = 0  # global input index of buf[0]
        self.a = 0  # next input index to produce output for

    def _run(self, b: int, last: bool) -> np.ndarray:
        lo = self.a - self.start
        left = min(self.pad, lo)
        seg_end = len(self.buf) if last else b - self.start + self.pad
        seg = self.buf[lo - left : seg_end]
        out = resample_poly(seg, self.up, self.down).astype(np.float32, copy=False)
        off = left * self.up // self.down
        n = -(-(b - self.a) * self.up // self.down) if last else (b - self.a) * self.up // self.down
        self.a = b
        return out[off : off + n]

    def feed(self, x: np.ndarray) -> Iterator[np.ndarray]:
        self.buf = np.concatenate([self.buf, x])
        end = self.start + len(self.buf)
        while self.a + self.block + self.pad <= end:
            yield self._run(self.a + self.block, last=False)
        drop = max(0, self.a - self.pad - self.start)  # keep left context only
        if drop:
            self.buf = self.buf[drop:]
            self.start += drop

    def finish(self) -> Iterator[np.ndarray]:
        end = self.start + len(self.buf)
        if end > self.a:
            yield self._run(end, last=True)


def mix_to_mono(data: np.ndarray) -> tuple[np.ndarray, bool]:
    """(mono, cancelled) for `data` of shape (frames, channels), float32.

    The mean of the channels, unless that mix is more than 20 dB quieter than the
    loudest channel: then the channels cancel (one wired in inverted polarity, or
    a phase-inverted copy), and the loudest channel alone is returned with
    `cancelled` True. Mono input is returned as is.
    """
    if data.shape[1] == 1:
        return data[:, 0], False
    mono = data.mean(axis=1, dtype=np.float32)
    per_channel = np.sqrt(np.mean(np.square(data, dtype=np.float64), axis=0))
    loudest = int(np.argmax(per_channel))
    mix_rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if per_channel[loudest] > 1e-4 and mix_rms < CANCEL_RATIO * per_channel[loudest]:
        return np.ascontiguousarray(data[:, loudest]), True
    return mono, False


def _mono_blocks(
    f: sf.SoundFile, name: str, block: int, notes: dict[str, Any]
) -> Iterator[np.ndarray]:
    """Float32 mono blocks; libsndfile errors mid-stream mean a corrupt file.
    Sets notes["channels_cancel"] when a block's channels cancelled in the mix."""
    while True:
        try:
            data = f.read(block, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise InputError(
                f"{name} is corrupt: decoding failed after {f.tell() / f.samplerate:.1f} s ({e}); "
                "re-export or re-upload it"
            ) from None
        if not len(data):
            return
        if not np.isfinite(data).all():
            raise InputError(f"{name} contains NaN or infinite samples; re-export it")
        mono, cancelled = mix_to_mono(data)
        if cancelled:
            notes["channels_cancel"] = True
        yield mono
        if len(data) < block:
            return


def decode_audio(
    path: Path,
    *,
    target_sr: int = 16000,
    max_seconds: float = 4 * 3600,
    notes: dict[str, Any] | None = None,
) -> tuple[np.ndarray, float]:
    """Float32 mono samples at `target_sr` (shape (n,), range [-1, 1]) and the
    duration in seconds.

    Validates everything that would otherwise surface as a crash or a silently
    wrong transcript: empty, truncated, corrupt or non-audio files, sample
    formats a header claims but the decoder cannot really read, rates and
    channel counts outside what we support, and overlong audio (all raise
    InputError). `notes`, when given, receives what was repaired on the way:
    {"channels_cancel": True} when the channels cancelled and one was used.
    """
    notes = {} if notes is None else notes
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror}") from None
    if size == 0:
        raise InputError(f"{name} is empty (0 bytes); the upload probably failed, upload it again")
    _check_wav_header(path, name)
    with _open(path) as f:
        sr, channels, declared_frames = f.samplerate, f.channels, f.frames
        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise InputError(
                f"{name} has a sample rate of {sr} Hz; supported rates are "
                f"{MIN_SAMPLE_RATE:,}-{MAX_SAMPLE_RATE:,} Hz (resample it, e.g. to 16 kHz)"
            )
        if not 1 <= channels <= MAX_CHANNELS:
            raise InputError(
                f"{name} has {channels} channels; at most {MAX_CHANNELS} are supported "
                "(mix it down to mono or stereo)"
            )
        if declared_frames <= 0:
            raise InputError(f"{name} contains no audio samples")
        if declared_frames / sr > max_seconds:
            raise InputError(
                f"{name} is {declared_frames / sr / 60:.1f} min long; the limit is "
                f"{max_seconds / 60:.1f} min (split the recording)"
            )
        limit_frames = int(max_seconds * sr) + 1
        resampler = _StreamResampler(sr, target_sr) if sr != target_sr else None
        parts: list[np.ndarray] = []
        read = 0
        for mono in _mono_blocks(f, name, max(1, int(_READ_BLOCK_S * sr)), notes):
            read += len(mono)
            if read > limit_frames:  # the header under-declared the length (e.g. MP3)
                raise InputError(
                    f"{name} is longer than the limit of {max_seconds / 60:.1f} min (split the recording)"
                )
            parts.extend(resampler.feed(mono) if resampler else [mono.copy()])
        if resampler:
            parts.extend(resampler.finish())
    if read == 0:
        raise InputError(f"{name} contains no audio samples")
    # Compressed formats fail softly when cut short: fewer frames than the header promised.
    if read < declared_frames - max(sr // 2, declared_frames // 20):
        raise InputError(
            f"{name} is truncated or corrupt: its header promises {declared_frames / sr:.1f} s "
            f"but only {read / sr:.1f} s could be decoded; upload the complete file"
        )
    samples = np.concatenate(parts) if len(parts) != 1 else parts[0]
    if not len(samples):
        raise InputError(f"{name} is too short to contain audio ({read} samples)")
    return np.ascontiguousarray(samples, dtype=np.float32), read / sr
