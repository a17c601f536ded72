"""Speech-to-text with a CTC model (wav2vec2, HuBERT, WavLM, data2vec-audio,
UniSpeech): any folder transformers loads with AutoModelForCTC and AutoProcessor.

    prepare   decode and resample the file (workers.audio), as for Whisper;
              plan overlapping windows (workers.ctc_windows); the model's
              per-file normalisation (zero mean, unit variance) is computed over
              the whole file once, so windows see the samples a one-pass run
              would
    predict   voice gate per window (silence, faint noise and tones never reach
              the model) -> windows of every file in the sub-batch, longest
              first, through the model together (up to max_chunks_per_forward
              per forward) -> argmax ids per frame -> each file's kept frames
              merged at the seams -> greedy CTC decoding (or the processor's
              language-model decoder when pyctcdecode and an LM are installed)
              per run of consecutive ungated windows -> a run whose decode has
              fewer than `min_text_chars` letters is no text ("near_empty";
              "empty" when nothing at all), counted per window in skipped_chunks

A CTC model has no P(nospeech): it writes a stray letter or two for noise
that passes the voice gate. An item whose runs all end gated or near-empty is
done with an empty transcript and `no_speech: true`, and gets no follow-up label.

Tier options (the ladder entry's extra keys): window_s (30), overlap_s (4),
max_chunks_per_forward (16), min_voice_s, min_text_chars (2), language (what
the result records; CTC models do not detect it).
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config.taskconfig import TierSpec
from workers.adapters.audio import decode_audio, resolve_audio_path
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.voice import MIN_VOICE_S, voice_gate
from workers.ctc_windows import Window, ctc_collapse, kept_parts, near_empty, plan_windows
from workers.device import is_oom  # out-of-memory belongs to the runtime (it shrinks the batch)

log = logging.getLogger("fleet.ctc")

WINDOW_S = 30.0
OVERLAP_S = 4.0
MIN_TEXT_CHARS = 2
PER_FORWARD = 16


@dataclass(frozen=True)
class CTCAudio:
    """A prepared file: its samples (mono float32 at the model's rate), the
    windows to run, and the normalisation over the whole file (mean 0, std 1:
    no normalisation)."""

    samples: np.ndarray
    windows: tuple[Window, ...]
    mean: float = 0.0
    std: float = 1.0


class CTCAdapter:
    """Adapter for a `transcribe` tier whose model is a CTC encoder."""

    kind = "transcribe"

    def __init__(self, *, audio_root: Path, max_audio_seconds: float = 4 * 3600) -> None:
        self.audio_root = Path(audio_root)
        self.max_audio_seconds = float(max_audio_seconds)
        self.model: Any = None
        self.processor: Any = None
        self.tier: TierSpec | None = None
        self.device = "cpu"
        self.dtype: Any = None
        self.sr = 16000
        self.decoder = "ctc_greedy"

    # ------------------------------------------------------------------ model

    def load(self, tier: TierSpec, model_path: str, device: str) -> None:
        """Load a CTC model and its processor from a local folder (never the hub).

        Raises ValueError for a model the windowing cannot serve (no
        convolutional feature encoder over raw samples) or an unknown dtype."""
        import torch
        from transformers import AutoModelForCTC, AutoProcessor

        is_cuda = torch.device(device).type == "cuda"
        dtype: Any = (
            (torch.float16 if is_cuda else torch.float32)
            if tier.dtype == "auto"
            else getattr(torch, tier.dtype, None)
        )
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tier {tier.name}: unknown dtype {tier.dtype!r}")
        self.unload()
        try:
            processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        except ImportError as e:  # a Wav2Vec2ProcessorWithLM folder without pyctcdecode/kenlm
            from transformers import AutoFeatureExtractor, AutoTokenizer, Wav2Vec2Processor

            log.warning(
                "tier %s ships a language model but its decoder is not installed (%s): "
                "greedy CTC decoding (pip install pyctcdecode kenlm for the LM)",
                tier.name,
                e,
            )
            processor = Wav2Vec2Processor(
                feature_extractor=AutoFeatureExtractor.from_pretrained(
                    model_path, local_files_only=True
                ),
                tokenizer=AutoTokenizer.from_pretrained(model_path, local_files_only=True),
            )
        model: Any = AutoModelForCTC.from_pretrained(model_path, dtype=dtype, local_files_only=True)
        cfg = model.config
        fe = getattr(processor, "feature_extractor", None)
        if (
            fe is None
            or "input_values" not in getattr(fe, "model_input_names", ())
            or not getattr(cfg, "conv_kernel", None)
            or getattr(cfg, "add_adapter", False)
        ):
            raise ValueError(
                f"tier {tier.name}: {type(model).__name__} does not read raw samples through a "
                "convolutional feature encoder, so its frames cannot be windowed; use a "
                "wav2vec2, HuBERT, WavLM or data2vec-audio CTC model"
            )
        self.processor = processor
        self.model = model.to(device).eval()
        self.tier, self.device, self.dtype = tier, device, dtype
        self.sr = int(fe.sampling_rate)
        self.decoder = "ctc_lm" if getattr(processor, "decoder", None) is not None else "ctc_greedy"

    def unload(self) -> None:
        """Drop the model and give its memory back."""
        was_cuda = self.model is not None and "cuda" in str(self.device)
        self.model = None
        self.processor = None
        self.tier = None
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    def _option(self, key: str, default: float) -> float:
        options = self.tier.options if self.tier is not None else {}
        return float(options.get(key, default))

    # ------------------------------------------------------------------ inputs

    def prepare(self, source: Source) -> Prepared:
        """Find, decode and window the file; cost is centiseconds of audio."""
        if self.model is None:
            raise RuntimeError("CTCAdapter.prepare called before load()")
        data = source.data if isinstance(source.data, dict) else {}
        uri = data.get("uri")
        if not isinstance(uri, str):
            raise InputError(
                f"audio item has no uri (data.uri is {type(uri).__name__}); "
                "set it to a path relative to the audio root"
            )
        path = resolve_audio_path(self.audio_root, uri)
        repaired: dict[str, Any] = {}
        samples, duration = decode_audio(
            path, target_sr=self.sr, max_seconds=self.max_audio_seconds, notes=repaired
        )
        cfg = self.model.config
        windows = plan_windows(
            len(samples),
            window=int(self._option("window_s", WINDOW_S) * self.sr),
            overlap=int(self._option("overlap_s", OVERLAP_S) * self.sr),
            kernels=cfg.conv_kernel,
            strides=cfg.conv_stride,
        )
        mean, std = 0.0, 1.0
        if getattr(self.processor.feature_extractor, "do_normalize", False):
            # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, over the whole file.
            mean = float(samples.mean(dtype=np.float64))
            std = float(np.sqrt(samples.var(dtype=np.float64) + 1e-7))
        notes: dict[str, Any] = {"duration_s": round(duration, 3), **repaired}
        declared = data.get("duration_s")
        if isinstance(declared, (int, float)) and abs(declared - duration) > max(
            1.0, 0.05 * duration
        ):
            notes["declared_duration_s"] = declared
        return Prepared(
            item_id=source.item_id,
            cost=max(1, round(duration * 100)),
            payload=CTCAudio(samples, tuple(windows), mean, std),
            notes=notes,
        )

    # ------------------------------------------------------------------ model run

    def log_probs(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """Log-probabilities per output frame of each (normalised) window, run as
        one padded forward: one float32 array (frames x vocabulary) per window,
        with the model's frame count for that window's length."""
        import torch

        assert self.model is not None and self.processor is not None
        lengths = [len(w) for w in windows]
        values = torch.zeros((len(windows), max(lengths)), dtype=torch.float32)
        mask = torch.zeros(values.shape, dtype=torch.long)
        for i, w in enumerate(windows):
            values[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        kwargs: dict[str, Any] = {}
        if getattr(self.processor.feature_extractor, "return_attention_mask", False):
            kwargs["attention_mask"] = mask.to(self.device)  # else zero padding (wav2vec2-base)
        with torch.inference_mode():
            logits = self.model(values.to(self.device, self.dtype), **kwargs).logits
            scores = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
            frames = self.model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
        return [scores[i, : int(n)] for i, n in enumerate(frames)]

    def _run(
        self, queue: list[tuple[int, int, np.ndarray]], per_forward: int
    ) -> dict[tuple[int, int], np.ndarray | InputError]:
        """(item, window, samples) -> that window's frames (argmax ids, or
        log-probabilities for an LM decoder), in forwards of up to
        `per_forward` windows, longest first. A non-OOM failure reruns the group's
        items one by one, so only the culprit fails."""
        out: dict[tuple[int, int], np.ndarray | InputError] = {}
        queue = sorted(queue, key=lambda q: -len(q[2]))
        for start in range(0, len(queue), per_forward):
            group = queue[start : start + per_forward]
            try:
                scores = self.log_probs([w for _, _, w in group])
            except Exception as exc:
                if is_oom(exc):
                    raise
                items = sorted({i for i, _, _ in group})
                if len(items) == 1:
                    err = InputError(f"transcription failed: {type(exc).__name__}: {exc}")
                    out.update({(i, k): err for i, k, _ in group})
                    continue
                for item in items:
                    out.update(self._run([q for q in group if q[0] == item], per_forward))
                continue
            for (i, k, _), f in zip(group, scores, strict=True):
                # Greedy decoding needs the best id per frame only; an LM decoder all scores.
                out[(i, k)] = f if self.decoder == "ctc_lm" else f.argmax(axis=-1)
        return out

    def _text(self, frames: list[np.ndarray]) -> str:
        """One run of consecutive windows' merged frames as text."""
        assert self.processor is not None and self.model is not None
        if self.decoder == "ctc_lm":
            return str(self.processor.decode(np.concatenate(frames)).text).strip()
        blank = self.model.config.pad_token_id
        if blank is None:
            blank = self.processor.tokenizer.pad_token_id
        ids = ctc_collapse(np.concatenate(frames).tolist(), blank=int(blank))
        tok = self.processor.tokenizer
        try:
            text = tok.decode(ids, skip_special_tokens=True, group_tokens=False)
        except TypeError:  # a tokenizer without CTC grouping: the ids are collapsed already
            text = tok.decode(ids, skip_special_tokens=True)
        return " ".join(str(text).split())

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """Every ungated window of every file, in as few forwards as the tier allows."""
        if self.model is None:
            raise RuntimeError("CTCAdapter.predict called before load()")
        per_forward = max(1, int(self._option("max_chunks_per_forward", PER_FORWARD)))
        min_voice_s = self._option("min_voice_s", MIN_VOICE_S)
        out: list[Prediction | InputError | None] = [None] * len(batch)
        gated: list[dict[int, str]] = [{} for _ in batch]
        queue: list[tuple[int, int, np.ndarray]] = []
        for i, prep in enumerate(batch):
            audio = prep.payload
            if not isinstance(audio, CTCAudio) or not audio.windows:
                out[i] = InputError("audio was not prepared for a CTC model (no windows)")
                continue
            for k, w in enumerate(audio.windows):
                raw = audio.samples[w.start : w.end]
                why = voice_gate(raw, sr=self.sr, min_voice_s=min_voice_s)
                if why:
                    gated[i][k] = why
                else:
                    queue.append((i, k, ((raw - audio.mean) / audio.std).astype(np.float32)))
        frames = self._run(queue, per_forward)
        for i, prep in enumerate(batch):
            if out[i] is None:
                out[i] = self._item(i, prep, gated[i], frames)
        return [o if o is not None else InputError("internal: no result") for o in out]

    def _item(
        self,
        i: int,
        prep: Prepared,
        gated: dict[int, str],
        frames: dict[tuple[int, int], np.ndarray | InputError],
    ) -> Prediction | InputError:
        """Merge one file's windows and decode its runs of ungated windows."""
        audio: CTCAudio = prep.payload
        mine = [frames.get((i, k)) for k in range(len(audio.windows))]
        failed = next((f for f in mine if isinstance(f, InputError)), None)
        if failed is not None:
            return failed
        skipped: Counter[str] = Counter(gated.values())
        texts: list[str] = []
        run: list[tuple[Window, np.ndarray]] = []
        merged = blank_frames = 0
        blank = self.model.config.pad_token_id
        for k, w in enumerate([*audio.windows, None]):
            f = mine[k] if w is not None else None
            if w is not None and isinstance(f, np.ndarray):
                run.append((w, f))
                continue
            if run:  # a gated window (or the end) closes the run
                kept = kept_parts([win for win, _ in run], [v for _, v in run])
                merged += sum(len(v) for v in kept)
                if self.decoder == "ctc_greedy" and blank is not None:
                    blank_frames += sum(int((v == blank).sum()) for v in kept)
                text = self._text(kept)
                if near_empty(text, min_chars=int(self._option("min_text_chars", MIN_TEXT_CHARS))):
                    skipped["near_empty" if text else "empty"] += len(run)  # windows
                else:
                    texts.append(text)
                run = []
        transcript = " ".join(texts)
        options = self.tier.options if self.tier is not None else {}
        output: dict[str, Any] = {
            "transcript": transcript,
            "no_speech": not transcript,
            "language": options.get("language") if transcript else None,
            "duration_s": prep.notes.get("duration_s"),
            "chunks": len(audio.windows),
            "frames": merged,
            "decoder": self.decoder,
        }
        if merged and self.decoder == "ctc_greedy":
            output["blank_share"] = round(blank_frames / merged, 3)
        if skipped:
            output["skipped_chunks"] = dict(sorted(skipped.items()))
        return Prediction(label=None, confidence=None, output=output)
