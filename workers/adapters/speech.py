"""The `transcribe` kind's adapter: each tier of the ladder is a Whisper model
(workers.adapters.transcribe) or a CTC model (workers.adapters.ctc), chosen by
the `model_type` in the tier's config.json, so one ladder may mix them
(Whisper base, then a smaller wav2vec2). The runtime prepares what is left
again after a step-down, so every file is windowed the way the new model reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from config.taskconfig import TierSpec
from workers.adapters.base import Adapter, InputError, Prediction, Prepared, Source
from workers.adapters.ctc import CTCAdapter
from workers.adapters.transcribe import TranscribeAdapter

# transformers' MODEL_FOR_CTC_MAPPING_NAMES entries that read raw samples through a
# convolutional feature encoder (what workers.ctc_windows can window).
CTC_MODEL_TYPES = (
    "wav2vec2",
    "wav2vec2-conformer",
    "hubert",
    "wavlm",
    "data2vec-audio",
    "unispeech",
    "unispeech-sat",
    "sew",
    "sew-d",
)


def speech_kind(model_type: str | None) -> str:
    """ "whisper" or "ctc" for a config.json `model_type`.

    Raises ValueError naming the kinds a transcribe tier may be."""
    if model_type == "whisper":
        return "whisper"
    if model_type in CTC_MODEL_TYPES:
        return "ctc"
    raise ValueError(
        f"model_type {model_type!r} is not a speech model a transcribe tier can run: use a "
        f"Whisper model or a CTC model of type {', '.join(CTC_MODEL_TYPES)}"
    )


def folder_speech_kind(model_path: str) -> str:
    """speech_kind() of the model in a folder; ValueError when config.json is unreadable."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {model_path}/config.json: {e}") from e
    return speech_kind(config.get("model_type"))


class SpeechAdapter:
    """Adapter for kind "transcribe": holds the Whisper or the CTC adapter of the
    loaded tier and hands every call to it."""

    kind = "transcribe"

    def __init__(self, *, audio_root: Path, max_audio_seconds: float = 4 * 3600) -> None:
        self.whisper = TranscribeAdapter(audio_root=audio_root, max_audio_seconds=max_audio_seconds)
        self.ctc = CTCAdapter(audio_root=audio_root, max_audio_seconds=max_audio_seconds)
        self.kinds: dict[str, Adapter] = {"whisper": self.whisper, "ctc": self.ctc}
        self.active: Adapter | None = None

    def check(self, tier: TierSpec, model_path: str) -> None:
        """Raise ValueError unless the tier's folder holds a Whisper or CTC model
        (config.json only: the runtime checks every tier before the first loads)."""
        try:
            folder_speech_kind(model_path)
        except ValueError as e:
            raise ValueError(f"tier {tier.name}: {e}") from None

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load the tier with the adapter its config.json's model_type names.

        Raises ValueError for a model that is neither Whisper nor CTC."""
        try:
            kind = folder_speech_kind(model_path)
        except ValueError as e:
            raise ValueError(f"tier {tier.name}: {e}") from None
        self.unload()
        self.kinds[kind].load(tier, model_path, device)
        self.active = self.kinds[kind]

    def unload(self) -> None:
        if self.active is not None:
            self.active.unload()
            self.active = None

    @property
    def audio_root(self) -> Path:
        """Where item uris are resolved (the same for both kinds)."""
        return self.ctc.audio_root

    @audio_root.setter
    def audio_root(self, root: Path) -> None:
        self.whisper.audio_root = self.ctc.audio_root = Path(root)

    @property
    def model(self) -> object:
        """The loaded model (None when no tier is loaded)."""
        return getattr(self.active, "model", None)

    def _loaded(self) -> Adapter:
        if self.active is None:
            raise RuntimeError("SpeechAdapter used before load()")
        return self.active

    def prepare(self, source: Source) -> Prepared:
        return self._loaded().prepare(source)

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        return self._loaded().predict(batch)
