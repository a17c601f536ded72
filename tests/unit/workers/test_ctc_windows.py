"""workers.ctc_windows: the window plan, the frame merge and greedy CTC decoding,
as pure functions (no model). wav2vec2's feature encoder: kernels
(10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2): 320 samples a frame."""

from __future__ import annotations

import pytest

from workers.ctc_windows import (
    Window,
    conv_frames,
    ctc_collapse,
    kept_parts,
    near_empty,
    plan_windows,
)

KERNELS = (10, 3, 3, 3, 3, 2, 2)
STRIDES = (5, 2, 2, 2, 2, 2, 2)
SR = 16000


@pytest.mark.parametrize(
    ("samples", "frames"),
    [(0, 0), (399, 0), (400, 1), (719, 1), (720, 2), (16000, 49), (30 * SR, 1499)],
)
def test_conv_frames_matches_wav2vec2(samples: int, frames: int) -> None:
    assert conv_frames(samples, KERNELS, STRIDES) == frames


def test_conv_frames_is_the_models_formula() -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC(
        Wav2Vec2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            conv_dim=(4,) * 7,
            vocab_size=8,
        )
    )
    for n in (400, 401, 720, 12345, 16000, 99999):
        expected = int(model._get_feat_extract_output_lengths(n))
        assert conv_frames(n, KERNELS, STRIDES) == expected, n


def plan(seconds: float, window_s: float = 30.0, overlap_s: float = 4.0) -> list[Window]:
    return plan_windows(
        int(seconds * SR),
        window=int(window_s * SR),
        overlap=int(overlap_s * SR),
        kernels=KERNELS,
        strides=STRIDES,
    )


@pytest.mark.parametrize(
    ("seconds", "count"),
    [(0.05, 1), (1.0, 1), (30.0, 1), (30.02, 2), (56.0, 2), (56.02, 3), (180.0, 7), (3600.0, 139)],
)
def test_window_count(seconds: float, count: int) -> None:
    assert len(plan(seconds)) == count


@pytest.mark.parametrize("seconds", [0.05, 1.0, 29.99, 30.0, 30.02, 56.02, 61.3, 180.0, 1234.567])
def test_kept_frames_tile_the_file(seconds: float) -> None:
    """No frame twice, none missing: the kept ranges, moved to file frames, are
    consecutive and end at the one-pass frame count; every window starts on a
    frame boundary and has the frames it keeps."""
    n = int(seconds * SR)
    windows = plan(seconds)
    position = 0
    for w in windows:
        assert w.start % 320 == 0 and 0 <= w.start < w.end <= n
        assert w.start // 320 + w.keep_from == position
        assert 0 <= w.keep_from < w.keep_to <= conv_frames(w.end - w.start, KERNELS, STRIDES)
        position = w.start // 320 + w.keep_to
    assert position == conv_frames(n, KERNELS, STRIDES)
    assert windows[-1].end == n


def test_seams_leave_context_on_both_sides() -> None:
    """Each inner seam has half the overlap (2 s, 100 frames) of audio on either side."""
    windows = plan(180.0)
    for left, right in zip(windows, windows[1:], strict=False):
        frames_left = conv_frames(left.end - left.start, KERNELS, STRIDES)
        assert frames_left - left.keep_to >= 99  # right context of the left window
        assert right.keep_from == 100  # left context of the right window


def test_plan_refuses_windows_that_do_not_advance() -> None:
    with pytest.raises(ValueError, match="do not advance"):
        plan(100.0, window_s=8.0, overlap_s=4.0)
    with pytest.raises(ValueError, match="at least 640 samples"):
        plan(100.0, window_s=8.0, overlap_s=0.0)


def test_kept_parts_and_merge() -> None:
    windows = [Window(0, 100, 0, 3), Window(64, 164, 1, 4)]
    parts = kept_parts(windows, [[1, 2, 3, 9], [9, 4, 5, 6, 9]])
    assert parts == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="gave 2 frames"):
        kept_parts(windows, [[1, 2, 3], [9, 4]])


@pytest.mark.parametrize(
    ("ids", "collapsed"),
    [
        ([], []),
        ([0, 0, 0], []),
        ([5, 5, 0, 5], [5, 5]),  # a blank between repeats keeps both ("ll")
        ([5, 5, 6, 6, 0, 7], [5, 6, 7]),
        ([0, 4, 4, 0, 8, 0, 0], [4, 8]),
    ],
)
def test_ctc_collapse(ids: list[int], collapsed: list[int]) -> None:
    assert ctc_collapse(ids, blank=0) == collapsed


@pytest.mark.parametrize(
    ("text", "empty"),
    [("", True), ("E", True), ("'", True), (" ' E ", True), ("OK", False), ("HELLO THERE", False)],
)
def test_near_empty(text: str, empty: bool) -> None:
    assert near_empty(text, min_chars=2) is empty
