"""Speech-to-text with a Whisper model in transformers format (see
`fleet.models.convert.whisper_ct2` for how the base and tiny.en weights get there).

Long files are cut into <= 30 s windows (Whisper's context) in `prepare`; the
windows of every file in a sub-batch go through the model together, so short
and long files share forwards and the GPU stays busy.

No speech, no text. Whisper writes something for every window it is given:
"you" for faint noise or a 50 ms click, words for a beep, "Aaaa..." runs for
a tone. Three checks stand between a window and a transcript:

    window -> voice gate (frame energy, steady tone; workers.audio.voice_gate)
           -> encoder, one decoder step at <|startoftranscript|>: language and
              P(<|nospeech|>)
           -> greedy decode, mean log-probability of the chosen tokens
           -> drop_reason(): the reference implementation's no-speech rule
              (P(nospeech) > 0.6 and mean log-prob < -1.0) and its repetition
              guard (gzip compression ratio of the text > 2.4)

openai/whisper (transcribe.py) re-decodes a window that fails the repetition or
log-prob check at rising temperatures; here such a window is dropped instead,
so results stay reproducible. An item whose windows all end dropped is done
with an empty transcript and `no_speech: true`, and gets no follow-up label.
"""

from __future__ import annotations

import gc
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config.taskconfig import TierSpec
from workers.adapters.audio import decode_audio, resolve_audio_path
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.voice import MIN_VOICE_S, chunk_audio, voice_gate
from workers.device import is_oom  # out-of-memory belongs to the runtime (it shrinks the batch)

SAMPLE_RATE = 16000
WINDOW_S = 30.0
# openai/whisper transcribe() defaults; tier options of the same names override them.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
# openai/whisper's sample_len (half the 448-token text context): a window of speech
# needs fewer; a decode stuck in a loop would otherwise hold its whole batch for 448 steps.
MAX_NEW_TOKENS = 224


def compression_ratio(text: str) -> float:
    """UTF-8 length of `text` over its zlib-compressed length (openai/whisper's
    repetition measure: a decoding stuck in a loop compresses very well)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def drop_reason(
    no_speech_prob: float,
    avg_logprob: float | None,
    text: str,
    *,
    no_speech_threshold: float = NO_SPEECH_THRESHOLD,
    logprob_threshold: float = LOGPROB_THRESHOLD,
    compression_ratio_threshold: float = COMPRESSION_RATIO_THRESHOLD,
) -> str | None:
    """Why a decoded window's text is not speech, or None to keep it.

    "no_speech_prob": P(<|nospeech|>) above the threshold and the decode not
    confident (mean log-prob below its threshold; None, e.g. under beam search,
    counts as not confident); "repetition": the text's compression ratio is
    above its threshold. Rules and defaults from openai/whisper transcribe.py.
    """
    if no_speech_prob > no_speech_threshold and (
        avg_logprob is None or avg_logprob < logprob_threshold
    ):
        return "no_speech_prob"
    if compression_ratio(text) > compression_ratio_threshold:
        return "repetition"
    return None


@dataclass(frozen=True)
class Decoded:
    """One window's decode: text, detected language (None for English-only
    models), P(<|nospeech|>) at the first step, mean log-probability per token,
    and whether it ended at the token limit instead of end-of-text."""

    text: str
    language: str | None
    no_speech_prob: float
    avg_logprob: float | None
    # The decode stopped at max_new_tokens, not at end-of-text: the window's
    # later speech may be missing from `text`.
    cut_short: bool = False


class _LogprobTracker:
    """A transformers logits processor that sums the log-probability of each token
    greedy decoding picks, per row, up to and including end-of-text (the
    reference's avg_logprob = sum / (tokens + 1)), without keeping every step's
    scores. At call t it reads the token chosen at t-1 from `input_ids`."""

    def __init__(self, eos: int) -> None:
        self.eos = eos
        self.prev: Any = None
        self.sums: Any = None
        self.counts: Any = None
        self.done: Any = None
        self.steps = 0  # decoding steps seen: one call per generated token

    def _take(self, tokens: Any) -> None:
        import torch

        picked = self.prev.gather(1, tokens[:, None]).squeeze(1)
        live = ~self.done
        self.sums += torch.where(live, picked, torch.zeros_like(picked))
        self.counts += live.to(self.counts.dtype)
        self.done |= tokens == self.eos

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.steps += 1
        if self.prev is None:
            n = scores.shape[0]
            self.sums = torch.zeros(n, dtype=torch.float64, device=scores.device)
            self.counts = torch.zeros(n, dtype=torch.float64, device=scores.device)
            self.done = torch.zeros(n, dtype=torch.bool, device=scores.device)
        else:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def at_limit(self, max_new_tokens: int) -> list[bool]:
        """Per row: still decoding when generation stopped at `max_new_tokens`
        (call before `finish`; generate strips the final end-of-text, so the
        last column cannot tell)."""
        if self.done is None or self.steps < max_new_tokens:
            return [False] * (0 if self.done is None else len(self.done))
        return [not d for d in self.done.tolist()]

    def finish(self, last_tokens: Any) -> list[float | None]:
        """Mean log-probability per row, given the last column of the sequences."""
        if self.prev is None:
            return []
        self._take(last_tokens.to(self.prev.device))
        return [
            float(s / c) if c > 0 else None
            for s, c in zip(self.sums.tolist(), self.counts.tolist(), strict=True)
        ]


# text, language, drop reason, P(nospeech), decode cut short at the token limit
ChunkResult = tuple[str, str | None, str | None, float, bool]


def _merge(
    results: dict[int, list[ChunkResult] | InputError],
    item: int,
    res: list[ChunkResult] | InputError,
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
        repaired: dict[str, Any] = {}
        samples, duration = decode_audio(
            path, target_sr=SAMPLE_RATE, max_seconds=self.max_audio_seconds, notes=repaired
        )
        search_s = 2.0 if self.tier is None else float(self.tier.options.get("cut_search_s", 2.0))
        chunks = chunk_audio(samples, sr=SAMPLE_RATE, window_s=WINDOW_S, cut_search_s=search_s)
        notes: dict[str, Any] = {"duration_s": round(duration, 3), **repaired}
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

    def _generate(self, chunks: list[np.ndarray]) -> list[Decoded]:
        """Decode chunks in one batch: the encoder runs once; one decoder step at
        <|startoftranscript|> gives P(<|nospeech|>) and (multilingual) the
        language; greedy generation reuses the encoder output."""
        import torch
        from transformers import LogitsProcessorList
        from transformers.modeling_outputs import BaseModelOutput

        assert self.model is not None and self.processor is not None
        on_cuda = "cuda" in str(self.device)
        features = self.processor.feature_extractor(
            chunks,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            device=str(self.device) if on_cuda else "cpu",  # log-mel on the GPU when there is one
        ).input_features.to(self.device, self.dtype)
        options = self.tier.options if self.tier is not None else {}
        kwargs: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS}
        for key in ("num_beams", "max_new_tokens"):
            if key in options:
                kwargs[key] = int(options[key])
        gen = self.model.generation_config
        no_speech_id = int(gen.no_timestamps_token_id) - 1  # <|nocaptions|> / <|nospeech|>
        n = len(chunks)
        languages: list[str | None] = [None] * n
        tracker = (
            _LogprobTracker(int(gen.eos_token_id)) if kwargs.get("num_beams", 1) == 1 else None
        )
        with torch.inference_mode():
            encoded = self.model.model.encoder(features).last_hidden_state
            sot = torch.full((n, 1), int(gen.decoder_start_token_id), device=encoded.device)
            first = self.model(encoder_outputs=(encoded,), decoder_input_ids=sot).logits[:, 0]
            no_speech = first.float().softmax(dim=-1)[:, no_speech_id].tolist()
            if self._id_to_lang:
                # Language from the same step (what detect_language does, without a second encoder pass).
                lang_ids = torch.tensor(sorted(self._id_to_lang), device=first.device)
                picked = lang_ids[first[:, lang_ids].argmax(dim=-1)].tolist()
                languages = [self._id_to_lang.get(int(i)) for i in picked]
                kwargs["language"] = [lang or "en" for lang in languages]
                kwargs["task"] = "transcribe"
            if tracker is not None:
                kwargs["logits_processor"] = LogitsProcessorList([tracker])
            ids = self.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded), **kwargs
            )
            # Beam search keeps no tracker: its windows are not checked for the limit.
            cut_short = tracker.at_limit(kwargs["max_new_tokens"]) if tracker else [False] * n
            logprobs: list[float | None] = tracker.finish(ids[:, -1]) if tracker else [None] * n
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [
            Decoded(t.strip(), lang, float(ns), lp, short)
            for t, lang, ns, lp, short in zip(
                texts, languages, no_speech, logprobs, cut_short, strict=True
            )
        ]

    def _judge(self, d: Decoded) -> ChunkResult:
        options = self.tier.options if self.tier is not None else {}
        reason = drop_reason(
            d.no_speech_prob,
            d.avg_logprob,
            d.text,
            no_speech_threshold=float(options.get("no_speech_threshold", NO_SPEECH_THRESHOLD)),
            logprob_threshold=float(options.get("logprob_threshold", LOGPROB_THRESHOLD)),
            compression_ratio_threshold=float(
                options.get("compression_ratio_threshold", COMPRESSION_RATIO_THRESHOLD)
            ),
        )
        if reason:
            return ("", None, reason, d.no_speech_prob, False)
        return (d.text, d.language, None, d.no_speech_prob, d.cut_short)

    def _run_groups(
        self, flat: list[tuple[int, np.ndarray]], per_forward: int
    ) -> dict[int, list[ChunkResult] | InputError]:
        """Transcribe (item index, chunk) pairs in groups; on a non-OOM failure
        redo that group's items one by one so only the culprit fails."""
        results: dict[int, list[ChunkResult] | InputError] = {}
        for start in range(0, len(flat), per_forward):
            group = flat[start : start + per_forward]
            try:
                decoded = self._generate([c for _, c in group])
            except Exception as exc:
                if is_oom(exc):
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
            for (item, _), d in zip(group, decoded, strict=True):
                _merge(results, item, [self._judge(d)])
        return results

    def predict(self, batch: list[Prepared]) -> list[Prediction | InputError]:
        """All chunks of all files, in as few generate calls as the tier allows."""
        if self.model is None:
            raise RuntimeError("TranscribeAdapter.predict called before load()")
        options = self.tier.options if self.tier is not None else {}
        per_forward = max(1, int(options.get("max_chunks_per_forward", 64)))
        min_voice_s = float(options.get("min_voice_s", MIN_VOICE_S))
        out: list[Prediction | InputError | None] = [None] * len(batch)
        n_chunks = [0] * len(batch)
        gated: list[Counter[str]] = [Counter() for _ in batch]
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
            shapes = [a.shape for a in arrays if a.ndim != 1]
            if shapes:  # prepare() always mixes to mono; anything else is not this adapter's input
                out[i] = InputError(
                    f"audio payload is not mono samples (a chunk of shape {shapes[0]})"
                )
                continue
            n_chunks[i] = len(arrays)
            for a in arrays:  # Whisper "hears" words in silence, clicks and tones: don't ask it
                why = voice_gate(a, sr=SAMPLE_RATE, min_voice_s=min_voice_s)
                if why:
                    gated[i][why] += 1
                else:
                    flat.append((i, a))
        # Failures stay per item; chunk results keep their order within an item.
        results = self._run_groups(flat, per_forward)
        default_language = None if self._id_to_lang else "en"
        for i, prep in enumerate(batch):
            if out[i] is not None:
                continue
            res = results.get(i, [])  # [] = the voice gate stopped every chunk
            if isinstance(res, InputError):
                out[i] = res
                continue
            kept = [r for r in res if r[2] is None]
            skipped = gated[i] + Counter(r[2] for r in res if r[2] is not None)
            langs = [r[1] for r in kept if r[1]]
            language = Counter(langs).most_common(1)[0][0] if langs else default_language
            transcript = " ".join(r[0] for r in kept if r[0])
            output: dict[str, Any] = {
                "transcript": transcript,
                "no_speech": not transcript,
                "language": language if transcript else None,
                "duration_s": prep.notes.get("duration_s"),
                "chunks": n_chunks[i],
            }
            if res:
                output["no_speech_prob"] = round(min(r[3] for r in res), 3)
            if skipped:
                output["skipped_chunks"] = dict(sorted(skipped.items()))
            cut_short = sum(1 for r in kept if r[4])
            if cut_short:  # never silently shortened: say how many windows stopped early
                output["cut_short_chunks"] = cut_short
                output["cut_short_reason"] = (
                    "the decode of a window reached max_new_tokens before end-of-text: its "
                    "later speech may be missing (raise the tier's max_new_tokens)"
                )
            out[i] = Prediction(label=None, confidence=None, output=output)
        return [o if o is not None else InputError("internal: no result") for o in out]
