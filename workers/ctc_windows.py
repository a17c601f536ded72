"""Overlapping windows over long audio for CTC speech models, merged by frames.

A CTC encoder (wav2vec2, HuBERT, WavLM, data2vec-audio) has no fixed context
like Whisper's 30 s, but its self-attention memory grows with the square of
the length: a long file runs as windows. Their outputs are merged frame by
frame so that the file reads as one frame sequence, with no frame twice and
none missing:

    samples  |----------------------- n -----------------------|
    window 0 |====== W ======|
    window 1            |====== W ======|
    window 2                       |====== W ======|   (the last one ends at n)
    kept     [  w0 frames   )[  w1 frames  )[   w2 frames   ]
                        ^ seam: the middle of each overlap

Every window starts on a multiple of the feature encoder's total stride
(320 samples, 20 ms at 16 kHz for wav2vec2), so frame f of a window starting
at sample s is frame s / stride + f of a one-pass run over the whole file (the
convolutions see the same samples). Each window keeps the frames between the
seams on either side; at a seam both windows have `overlap / 2` of audio as
context, so the kept frames are what a one-pass run gives wherever the
model's reach is shorter than that (the convolutional position embedding of
wav2vec2 reaches 64 frames, 1.28 s), and close to it otherwise.

The same frame-merge idea as the chunked CTC inference of transformers'
ASR pipeline (`chunk_length_s` / `stride_length_s`, after "Making automatic
speech recognition work on large files with Wav2Vec2 in Transformers",
Hugging Face blog, 2022), done on frame indices instead of logits' ratios.

Pure functions; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Window:
    """One window: samples [start, end) of the file, and the frames it keeps,
    [keep_from, keep_to) counted in the window's own output frames."""

    start: int
    end: int
    keep_from: int
    keep_to: int


def conv_frames(samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Output frames of a stack of unpadded 1-D convolutions over `samples`
    inputs: per layer floor((n - kernel) / stride) + 1, 0 when the input is
    shorter than a kernel (transformers' `_get_feat_extract_output_lengths`)."""
    n = samples
    for k, s in zip(kernels, strides, strict=True):
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def plan_windows(
    samples: int,
    *,
    window: int,
    overlap: int,
    kernels: Sequence[int],
    strides: Sequence[int],
) -> list[Window]:
    """Windows over a file of `samples` samples (all lengths in samples).

    `window` and `overlap` are rounded down to multiples of the total stride;
    consecutive windows overlap by `overlap`, the seam in its middle. A file no
    longer than `window` is one window. The last window ends at the file's end
    (it is longer than `overlap`, so its kept frames exist). The kept frames
    of all windows add up to `conv_frames(samples, ...)`, in order.

    Raises ValueError when `window` is not longer than `2 * overlap` plus the
    receptive field (the windows would not advance), or `overlap` is not at
    least two strides.
    """
    stride = math.prod(strides)
    window -= window % stride
    overlap -= overlap % (2 * stride)  # the seam falls on a frame boundary
    total = conv_frames(samples, kernels, strides)
    if samples <= window:
        return [Window(0, samples, 0, total)]
    receptive = _receptive_field(kernels, strides)
    if overlap < 2 * stride or window - overlap <= overlap + receptive:
        raise ValueError(
            f"window of {window} samples and overlap of {overlap} samples do not advance: "
            f"use an overlap of at least {2 * stride} samples and a window longer than "
            f"twice the overlap plus {receptive} samples"
        )
    step = window - overlap
    count = -(-(samples - window) // step) + 1  # the fewest windows that reach the end
    starts = [i * step for i in range(count)]
    # Seams in global frames: the middle of each overlap.
    seams = [(s + overlap // 2) // stride for s in starts[1:]]
    bounds = [0, *seams, total]
    out = []
    for i, start in enumerate(starts):
        end = min(start + window, samples)
        first = start // stride
        out.append(Window(start, end, bounds[i] - first, bounds[i + 1] - first))
    return out


def _receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples one output frame of the convolution stack sees (400 for wav2vec2)."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides, strict=True):
        field += (k - 1) * jump
        jump *= s
    return field


def kept_parts(windows: Sequence[Window], outputs: Sequence[Any]) -> list[Any]:
    """Each window's kept frames: `outputs[i]` holds window i's per-frame values
    (argmax ids, or a frames x vocabulary array), sliced to [keep_from, keep_to).
    Concatenated, the parts of all windows of a file are its frame sequence.

    Raises ValueError when a window produced fewer frames than it must keep
    (the model's frame count disagrees with the plan)."""
    parts: list[Any] = []
    for w, values in zip(windows, outputs, strict=True):
        if len(values) < w.keep_to:
            raise ValueError(
                f"window at sample {w.start} gave {len(values)} frames; its plan keeps "
                f"frames {w.keep_from}..{w.keep_to}"
            )
        parts.append(values[w.keep_from : w.keep_to])
    return parts


def ctc_collapse(ids: Sequence[int], *, blank: int) -> list[int]:
    """Greedy CTC decoding of per-frame token ids: merge repeats, drop blanks
    (Graves et al., 2006, "Connectionist temporal classification")."""
    out: list[int] = []
    prev: int | None = None
    for t in ids:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def near_empty(text: str, *, min_chars: int) -> bool:
    """Whether a decode holds fewer than `min_chars` letters or digits: what a CTC
    model emits for noise (a stray "e", an apostrophe), not a transcript."""
    return sum(ch.isalnum() for ch in text) < min_chars
