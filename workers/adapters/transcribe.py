"""Speech-to-text with a Whisper model in transformers format (see
`workers.prepare.whisper_ct2` for how the tiny.en weights get there).

Long files are cut into <= 30 s windows (Whisper's context) in `prepare`; the
windows of every file in a sub-batch go through the model together, so short
and long files share forwards and the GPU stays busy.
"""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from workers.adapters.base import InputError, Prediction, Prepared, Source, TierSpec
from workers.audio import chunk_audio, decode_audio, resolve_audio_path

SAMPLE_RATE = 16000
WINDOW_S = 30.0
SILENCE_PEAK = 1e-3  # -60 dBFS: below this a chunk is treated as silence (option "silence_peak")


def _is_oom(exc: BaseException) -> bool:
    """Out-of-memory errors belong to the runtime (it shrinks the batch)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _merge(
    results: dict[int, list[tuple[str, str | None]] | InputError],
    item: int,
    res: list[tuple[str, str | None]] | InputError,
) -> None:
    """Append an item's chunk results in order; a failure wins over partial text."""
    prev = results.get(item)
    if isinstance(prev, InputError):
        return
    if isinstance(res, InputError) or prev is None:
        results[item] = res if isinstance(res, InputError) else list(res)
    else:
        prev.extend(res)


class TranscribeAdapter:
    """Adapter for kind "transcribe": audio uri in, transcript out."""

    kind = "transcribe"

    def __init__(self, *, audio_root: Path, max_audio_seconds: float = 4 * 3600) -> None:
        self.audio_root = Path(audio_root)
        self.max_audio_seconds = float(max_audio_seconds)
        self.model: Any = None
        self.processor: Any = None
        self.tier: TierSpec | None = None
        self.device = "cpu"
        self.dtype: Any = None
        self._id_to_lang: dict[int, str] = {}

    # ------------------------------------------------------------------ model

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load model and processor from a local folder (never the hub)."""
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        is_cuda = torch.device(device).type == "cuda"
        dtype: Any = (
            (torch.float16 if is_cuda else torch.float32)
            if tier.dtype == "auto"
            else getattr(torch, tier.dtype, None)
        )
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tier {tier.name}: unknown dtype {tier.dtype!r}")
        self.unload()
        model: Any = WhisperForConditionalGeneration.from_pretrained(
            model_path, dtype=dtype, local_files_only=True
        )
        self.processor = WhisperProcessor.from_pretrained(model_path, local_files_only=True)
        self.model = model.to(device).eval()
        self.tier, self.device, self.dtype = tier, device, dtype
        gen = self.model.generation_config
        self._id_to_lang = (
            {i: tok.strip("<|>") for tok, i in gen.lang_to_id.items()}
            if getattr(gen, "is_multilingual", False) and getattr(gen, "lang_to_id", None)
            else {}
        )

    def unload(self) -> None:
        """Drop the model and give its memory back."""
        was_cuda = self.model is not None and "cuda" in str(self.device)
        self.model = None
        self.processor = None
        self.tier = None
        self._id_to_lang = {}
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ inputs

    def prepare(self, source: Source) -> Prepared:
        """Find, decode and chunk the file; cost is centiseconds of audio."""
        data = source.data if isinstance(source.data, dict) else {}
        uri = data.get("uri")
        if not isinstance(uri, str):
            raise InputError(
                f"audio item has no uri (data.uri is {type(uri).__name__}); "
                "set it to a path relative to the audio root"
            )
        path = resolve_audio_path(self.audio_root, uri)
        samples, duration = decode_audio(
            path, target_sr=SAMPLE_RATE, max_seconds=self.max_audio_seconds
        )
        search_s = 2.0 if self.tier is None else float(self.tier.options.get("cut_search_s", 2.0))
        chunks = chunk_audio(samples, sr=SAMPLE_RATE, window_s=WINDOW_S, cut_search_s=search_s)
        notes: dict[str, Any] = {"duration_s": round(duration, 3)}
        declared = data.get("duration_s")
        if isinstance(declared, (int, float)) and abs(declared - duration) > max(
            1.0, 0.05 * duration
        ):
            notes["declared_duration_s"] = declared  # the producer's figure was off
        return Prepared(
            item_id=source.item_id,
            cost=max(1, round(duration * 100)),
            payload=chunks,
            notes=notes,
        )

    # ------------------------------------------------------------------ model run

    def _generate(self, chunks: list[np.ndarray]) -> tuple[list[str], list[str | None]]:
        """Transcribe chunks in one forward: (texts, language per chunk)."""
        import torch

        assert self.model is not None and self.processor is not None
        on_cuda = "cuda" in str(self.device)
        features = self.processor.feature_extractor(
            chunks,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            device=str(self.device) if on_cuda else "cpu",  # log-mel on the GPU when there is one
        ).input_features.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {}
        options = self.tier.options if self.tier is not None else {}
        for key in ("num_beams", "max_new_tokens"):  # e.g. cap runaway repetition loops
            if key in options:
                kwargs[key] = int(options[key])
        languages: list[str | None] = ["en"] * len(chunks)
        with torch.inference_mode():
            if self._id_to_lang:
                # Detect once, then pass the languages so generate does not detect again.
                lang_ids = self.model.detect_language(input_features=features).tolist()
                languages = [self._id_to_lang.get(int(i)) for i in lang_ids]
                kwargs["language"] = [lang or "en" for lang in languages]
                kwargs["task"] = "transcribe"
            ids = self.model.generate(features, **kwargs)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [t.strip() for t in texts], languages

    def _run_groups(
        self, flat: list[tuple[int, np.ndarray]], per_forward: int
    ) -> dict[int, list[tuple[str, str | None]] | InputError]:
        """Transcribe (item index, chunk) pairs in groups; on a non-OOM failure
        redo that group's items one by one so only the culprit fails."""
        results: dict[int, list[tuple[str, str | None]] | InputError] = {}
        for start in range(0, len(flat), per_forward):
            group = flat[start : start + per_forward]
            try:
                texts, langs = self._generate([c for _, c in group])
            except Exception as exc:
                if _is_oom(exc):
                    raise
                items = sorted({i for i, _ in group})
                if len(items) == 1:
                    results[items[0]] = InputError(
                        f"transcription failed: {type(exc).__name__}: {exc}"
                    )
                    continue
                for item in items:
                    mine = [(i, c) for i, c in group if i == item]
                    for key, res in self._run_groups(mine, per_forward).items():
                        _merge(results, key, res)
                continue
            for (item, _), text, lang in zip(group, texts, langs, strict=True):
                _merge(results, item, [(text, lang)])
        return results

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """All chunks of all files, in as few generate calls as the tier allows."""
        if self.model is None:
            raise RuntimeError("TranscribeAdapter.predict called before load()")
        options = self.tier.options if self.tier is not None else {}
        per_forward = max(1, int(options.get("max_chunks_per_forward", 64)))
        # Whisper "hears" words (typically "you") in digital silence: don't ask it.
        silence_peak = float(options.get("silence_peak", SILENCE_PEAK))
        out: list[Prediction | InputError | None] = [None] * len(batch)
        n_chunks = [0] * len(batch)
        flat: list[tuple[int, np.ndarray]] = []
        for i, prep in enumerate(batch):
            chunks = prep.payload
            if not isinstance(chunks, list) or not chunks:
                out[i] = InputError("audio has no chunks to transcribe")
                continue
            try:
                arrays = [np.asarray(c, dtype=np.float32) for c in chunks]
            except (TypeError, ValueError) as exc:
                out[i] = InputError(f"audio payload is not numeric samples: {exc}")
                continue
            n_chunks[i] = len(arrays)
            flat.extend(
                (i, a) for a in arrays if a.size and float(np.max(np.abs(a))) >= silence_peak
            )
        # Failures stay per item; chunk results keep their order within an item.
        results = self._run_groups(flat, per_forward)
        default_language = None if self._id_to_lang else "en"
        for i, prep in enumerate(batch):
            if out[i] is not None:
                continue
            res = results.get(i, [])  # [] = every chunk was silent
            if isinstance(res, InputError):
                out[i] = res
                continue
            langs = [lang for _, lang in res if lang]
            language = Counter(langs).most_common(1)[0][0] if langs else default_language
            out[i] = Prediction(
                label=None,
                confidence=None,
                output={
                    "transcript": " ".join(t for t, _ in res if t),
                    "language": language,
                    "duration_s": prep.notes.get("duration_s"),
                    "chunks": n_chunks[i],
                },
            )
        return [o if o is not None else InputError("internal: no result") for o in out]
