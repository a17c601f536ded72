"""Model adapters, one per task kind. Chosen by name, imported lazily so that
only the worker that runs a kind pays for its imports."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.taskconfig import TaskSpec
    from workers.adapters.base import Adapter


def make_adapter(spec: TaskSpec, *, max_chars: int, audio_root: Path) -> Adapter:
    if spec.kind == "sequence_classify":
        from workers.adapters.sequence_classify import SequenceClassifyAdapter

        return SequenceClassifyAdapter(
            max_chars=max_chars, top_k=spec.options.get("top_k"), labels=spec.labels
        )
    if spec.kind == "transcribe":
        from workers.adapters.speech import SpeechAdapter  # Whisper and CTC tiers

        return SpeechAdapter(audio_root=audio_root)
    if spec.kind == "llm_classify":
        from workers.adapters.llm_classify import LLMClassifyAdapter

        return LLMClassifyAdapter(labels=spec.labels, max_chars=max_chars, **spec.options)
    if spec.kind == "zero_shot":
        from workers.adapters.zero_shot import ZeroShotAdapter

        return ZeroShotAdapter(labels=spec.labels, max_chars=max_chars, **spec.options)
    if spec.kind == "fake":
        from workers.adapters.fake import FakeAdapter, fake_options

        return FakeAdapter(max_chars=max_chars, **fake_options(spec.options))
    raise ValueError(f"no adapter for task kind {spec.kind!r}")
