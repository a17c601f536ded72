"""The decode-time checks of workers.adapters.transcribe: openai/whisper's
no-speech rule and repetition guard as a pure decision, and the per-token
log-probability bookkeeping that feeds it. No model needed.

The table's rows are what Whisper base and tiny.en really returned on the
hostile inputs of issue 14 (tests/integration/test_whisper.py runs them).
"""

from __future__ import annotations

import math

import pytest
import torch

from workers.adapters.transcribe import _LogprobTracker, compression_ratio, drop_reason


def test_compression_ratio() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("you") < 1.0  # short text: zlib's overhead dominates
    assert compression_ratio("He was not an ill-disposed young man.") < 1.0
    assert compression_ratio("A" * 200) > 10
    assert compression_ratio("Thank you. " * 30) > 2.4


@pytest.mark.parametrize(
    ("no_speech", "logprob", "text", "reason"),
    [
        # Real speech: low P(nospeech), confident decode.
        (0.024, -0.14, "He was not an ill-disposed young man.", None),
        (0.114, -0.43, "Ten of clubs.", None),
        # "you" invented for faint noise / 50 ms (base): dropped by the reference rule.
        (0.938, -1.16, "you", "no_speech_prob"),
        (0.942, -1.24, "you", "no_speech_prob"),
        # A steady tone (tiny.en): just over the thresholds.
        (0.607, -1.75, "Beeping", "no_speech_prob"),
        # High P(nospeech) but a confident decode is kept (the reference's exception):
        # this is why a voice gate runs before decoding (one sample, tiny.en: -0.86).
        (0.886, -0.86, "you", None),
        # No log-probability (beam search): P(nospeech) alone decides.
        (0.7, None, "you", "no_speech_prob"),
        (0.3, None, "Hello there.", None),
        # A repetition loop.
        (0.2, -0.3, "Aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "repetition"),
        (0.2, -0.3, "I'm sorry. " * 20, "repetition"),
    ],
)
def test_drop_reason(
    no_speech: float, logprob: float | None, text: str, reason: str | None
) -> None:
    assert drop_reason(no_speech, logprob, text) == reason


def test_drop_reason_thresholds_are_options() -> None:
    assert drop_reason(0.5, -2.0, "you", no_speech_threshold=0.4) == "no_speech_prob"
    assert drop_reason(0.9, -2.0, "you", logprob_threshold=-3.0) is None
    assert drop_reason(0.1, -0.1, "la la la la la la la la", compression_ratio_threshold=1.5) == (
        "repetition"
    )


def test_logprob_tracker_follows_greedy_choices_until_eos() -> None:
    """Two rows, vocab of 4, eos = 3. Row 0 picks 1 then eos; row 1 picks 2, 2 and is
    cut by max_new_tokens. avg = sum of chosen log-probs / tokens (eos included)."""
    eos = 3
    steps = [
        torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 2.0, 1.0]]),
        torch.tensor([[9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]),  # row 0 is padding now
    ]
    chosen = [[1, 2], [eos, 2], [eos, 0]]
    tracker = _LogprobTracker(eos)
    ids = torch.tensor([[50], [50]])  # the prompt
    for scores, picks in zip(steps, chosen, strict=True):
        assert tracker(ids, scores) is scores
        ids = torch.cat([ids, torch.tensor(picks)[:, None]], dim=1)
    got = tracker.finish(ids[:, -1])

    def lp(scores: torch.Tensor, row: int, tok: int) -> float:
        return float(torch.log_softmax(scores[row], dim=-1)[tok])

    row0 = (lp(steps[0], 0, 1) + lp(steps[1], 0, eos)) / 2
    row1 = (lp(steps[0], 1, 2) + lp(steps[1], 1, 2) + lp(steps[2], 1, 0)) / 3
    assert got[0] == pytest.approx(row0) and got[1] == pytest.approx(row1)
    assert all(math.isfinite(g) for g in got if g is not None)


def test_logprob_tracker_with_no_steps() -> None:
    assert _LogprobTracker(3).finish(torch.tensor([1])) == []
