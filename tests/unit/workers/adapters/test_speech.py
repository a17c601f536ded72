"""workers.adapters.speech: which adapter a transcribe tier's config.json names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.adapters.speech import folder_speech_kind, speech_kind


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [
        ("whisper", "whisper"),
        ("wav2vec2", "ctc"),
        ("hubert", "ctc"),
        ("wavlm", "ctc"),
        ("data2vec-audio", "ctc"),
        ("wav2vec2-conformer", "ctc"),
    ],
)
def test_speech_kind(model_type: str, kind: str) -> None:
    assert speech_kind(model_type) == kind


@pytest.mark.parametrize("model_type", ["bert", "wav2vec2-bert", "parakeet_ctc", None])
def test_not_a_speech_model(model_type: str | None) -> None:
    """BERT is not speech; wav2vec2-bert and Parakeet read mel features, not samples."""
    with pytest.raises(ValueError, match="Whisper model or a CTC model of type wav2vec2"):
        speech_kind(model_type)


def test_folder_speech_kind(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    assert folder_speech_kind(str(tmp_path)) == "ctc"
    with pytest.raises(ValueError, match="cannot read"):
        folder_speech_kind(str(tmp_path / "missing"))
