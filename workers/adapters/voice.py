"""What of a decoded recording reaches a speech model, and in which pieces.

`voice_gate` (frame energy and a steady-tone test) keeps silence, faint noise,
clicks and tones away from the model; `chunk_audio` cuts long audio into
windows at pauses. numpy only: no torch, testable anywhere. Samples are mono
float32 at `sr` Hz (workers.adapters.audio.decode_audio).
"""

from __future__ import annotations

import numpy as np

_MIN_TAIL_S = 0.1


VOICE_DBFS = -50.0  # a frame quieter than this (RMS, dB full scale) holds no voice
MIN_VOICE_S = 0.1  # less loud time than this is not a word
STEADY_SHARE = 0.85  # this share of loud frames peaking at one frequency: a tone, not a voice


def _frames(x: np.ndarray, frame: int) -> np.ndarray:
    n = len(x) // frame
    return x[: n * frame].reshape(n, frame).astype(np.float64)


def _loud(frames: np.ndarray, min_dbfs: float) -> np.ndarray:
    rms = np.sqrt(np.mean(np.square(frames), axis=1)) if len(frames) else np.zeros(0)
    return frames[rms >= 10 ** (min_dbfs / 20)]


def voiced_seconds(
    samples: np.ndarray, *, sr: int = 16000, frame_s: float = 0.02, min_dbfs: float = VOICE_DBFS
) -> float:
    """Seconds of `samples` (mono float, [-1, 1]) in `frame_s` frames whose RMS is at
    least `min_dbfs`: the short-time energy gate of classic endpoint detection
    (Rabiner & Sambur, 1975). Digital silence, faint noise and clicks score ~0."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    frame = max(1, int(frame_s * sr))
    return len(_loud(_frames(x, frame), min_dbfs)) * frame / sr


def is_steady_tone(
    samples: np.ndarray, *, sr: int = 16000, frame_s: float = 0.04, min_dbfs: float = VOICE_DBFS
) -> bool:
    """Whether the loud part of `samples` is one steady tone (a sine, a dial or
    DTMF tone, a beep): at least STEADY_SHARE of its loud frames have their
    strongest FFT bin (25 Hz wide) at the same frequency. Speech moves its pitch
    and formants: on the recorded prompts of asterisk-core-sounds-en and
    pocketsphinx-testdata this share stays below 0.7, even for a sung-out "y"."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    frame = max(1, int(frame_s * sr))
    loud = _loud(_frames(x, frame), min_dbfs)
    if len(loud) < 3:
        return False
    peaks = np.argmax(np.abs(np.fft.rfft(loud * np.hanning(frame), axis=1)), axis=1)
    values, counts = np.unique(peaks, return_counts=True)
    mode = values[int(np.argmax(counts))]
    return float(np.mean(peaks == mode)) >= STEADY_SHARE


def voice_gate(
    samples: np.ndarray, *, sr: int = 16000, min_voice_s: float = MIN_VOICE_S
) -> str | None:
    """Why `samples` cannot hold speech ("quiet": under `min_voice_s` of frames
    above VOICE_DBFS; "tone": one steady tone), or None when they may. Run before
    decoding: Whisper answers "you" for faint noise, a single sample or 50 ms, and
    words for beeps."""
    if voiced_seconds(samples, sr=sr) < min_voice_s:
        return "quiet"
    if is_steady_tone(samples, sr=sr):
        return "tone"
    return None


# ----------------------------------------------------------------------------- chunking


PAUSE_BELOW_PEAK_DB = 30.0  # a frame this far under the loudest one near a cut is a pause


def _pause_cut(samples: np.ndarray, lo: int, hi: int, frame: int) -> int:
    """Index in [lo, hi] at the centre of the longest pause, so no word is cut.

    A `frame` is quiet when its RMS is under VOICE_DBFS or PAUSE_BELOW_PEAK_DB
    under the loudest frame of [lo, hi] (the short-time energy endpoint
    detection of Rabiner & Sambur, 1975, relative to the level near the cut).
    The longest run of quiet frames wins, the latest of equally long ones
    (longer chunks, fewer of them): a 150 ms gap between words beats a 20 ms
    dropout inside a word, which the single quietest frame would pick. With no
    quiet frame at all, the quietest frame's centre."""
    seg = samples[lo:hi]
    n = len(seg) // frame
    if n < 2:
        return hi
    rms = np.sqrt(np.mean(np.square(seg[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    level = max(10 ** (VOICE_DBFS / 20), float(rms.max()) * 10 ** (-PAUSE_BELOW_PEAK_DB / 20))
    quiet = np.concatenate([[False], rms <= level, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    if len(edges) == 0:
        best = n - 1 - int(np.argmin(rms[::-1]))
        return lo + best * frame + frame // 2
    starts, stops = edges[0::2], edges[1::2]
    lengths = stops - starts
    i = len(lengths) - 1 - int(np.argmax(lengths[::-1]))
    return lo + int((starts[i] + stops[i]) * frame // 2)


def chunk_audio(
    samples: np.ndarray, *, sr: int = 16000, window_s: float = 30.0, cut_search_s: float = 0.0
) -> list[np.ndarray]:
    """Split into windows of at most `window_s` (Whisper sees 30 s at a time).

    With `cut_search_s` > 0 each cut moves back to the middle of the longest
    pause (20 ms frames, see _pause_cut) in the last `cut_search_s` seconds of
    its window, so words are not split. A tail
    shorter than 0.1 s is dropped unless it is the only chunk. Chunks are views.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"chunk_audio expects mono samples, got shape {samples.shape}")
    window = int(window_s * sr)
    if window <= 0:
        raise ValueError("window_s must be positive")
    search = min(int(cut_search_s * sr), window // 2)
    min_tail = int(_MIN_TAIL_S * sr)
    chunks: list[np.ndarray] = []
    pos, total = 0, len(samples)
    while pos < total:
        end = min(pos + window, total)
        if end < total and search > 0:
            end = _pause_cut(samples, end - search, end, max(1, sr // 50))
        chunks.append(samples[pos:end])
        pos = end
    if len(chunks) > 1 and len(chunks[-1]) < min_tail:
        chunks.pop()
    return chunks
