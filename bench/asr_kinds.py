"""Real-time factor of the two kinds of transcribe tier, Whisper and CTC, at
comparable sizes, side by side in one process on the same audio.

    .venv/bin/python -m bench.asr_kinds [--rounds 2] [--threads N] [--models-dir DIR]
                                        [--device cpu|cuda] [--json]

Pairs (parameters): whisper-base (74M) with a wav2vec2-base shaped CTC model
(94M, the shape of facebook/wav2vec2-base-960h), whisper-tiny.en (38M) with a
half-width, half-depth wav2vec2 (bench.ctc_model's "small", 14M). The Whisper
tiers are the bundled converted checkpoints (`fleet models prepare`); no CTC
checkpoint installs offline, so the CTC models carry random weights
(bench.ctc_model): their compute and memory are the real ones, their text is
meaningless, so only the Whisper rows have a word error rate.

Audio: the five LibriVox sentences of pocketsphinx-testdata (real read speech,
16 kHz) plus one file of all five strung together with 1 s pauses (longer than
a window, so both kinds cut it). Each model runs every file through
`SpeechAdapter.predict` in one call (the worker's batched path, decoding and
resampling included), `--rounds` times, in alternating model order per round;
the best round counts. RTF = wall seconds / audio seconds (lower is faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.asr import POCKETSPHINX, _sphinx, corpus_wer, normaliser
from bench.ctc_model import build_ctc_model

PAIRS = (("whisper-base", "wav2vec2-base-random"), ("whisper-tiny.en", "wav2vec2-small-random"))
CTC_SHAPES = {"wav2vec2-base-random": "base", "wav2vec2-small-random": "small"}


def audio_files(root: Path) -> list[tuple[str, str]]:
    """(uri under `root`, transcript): the LibriVox sentences, copied as they are,
    and `all.wav`, the five with 1 s of silence between them."""
    import soundfile as sf

    librivox = _sphinx("librivox", "transcription")
    if not librivox.items:
        raise SystemExit(f"no recordings under {POCKETSPHINX}: install pocketsphinx-testdata")
    out, parts = [], []
    for rec in librivox.items:
        samples, sr = sf.read(librivox.root / rec.uri, dtype="float32")
        sf.write(root / rec.uri, samples, sr)
        parts += [samples, np.zeros(sr, np.float32)]
        out.append((rec.uri, rec.text))
    sf.write(root / "all.wav", np.concatenate(parts), sr)
    out.append(("all.wav", " ".join(r.text for r in librivox.items)))
    return out


def load(name: str, models_dir: Path, ctc_dir: Path, root: Path, device: str) -> Any:
    """A SpeechAdapter with `name` loaded: a bundled Whisper tier (prepared when
    missing) or a random-weight CTC model (built once into `ctc_dir`)."""
    from config.taskconfig import TierSpec
    from fleet.models.prepare import prepare_models
    from workers.adapters.speech import SpeechAdapter

    if name in CTC_SHAPES:
        path = build_ctc_model(ctc_dir / name, shape=CTC_SHAPES[name], seed=0, blank_bias=2.0)
    else:
        for _n, path, took in prepare_models(models_dir, only=[name], echo=lambda m: None):
            print(f"{name}: ready in {path} ({took:.1f} s)", file=sys.stderr)
        path = models_dir / name
    adapter = SpeechAdapter(audio_root=root)
    adapter.load(TierSpec(name=name, path=str(path)), str(path), device)
    return adapter


def transcribe(adapter: Any, files: list[tuple[str, str]]) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds for prepare + predict over every file, and the outputs."""
    from workers.adapters.base import Prediction, Source

    started = time.perf_counter()
    prepared = [
        adapter.prepare(Source(i, "audio", u, {"uri": u})) for i, (u, _) in enumerate(files)
    ]
    preds = adapter.predict(prepared)
    seconds = time.perf_counter() - started
    outputs = []
    for (uri, _), p in zip(files, preds, strict=True):
        if not isinstance(p, Prediction) or p.output is None:
            raise SystemExit(f"{uri} failed: {p}")
        outputs.append(p.output)
    return seconds, outputs


def measure(models_dir: Path, ctc_dir: Path, rounds: int, device: str) -> list[dict[str, Any]]:
    """One row per model: parameters, audio seconds, best wall seconds, RTF, WER."""
    with tempfile.TemporaryDirectory(prefix="asr-kinds-") as tmp:
        root = Path(tmp)
        files = audio_files(root)
        names = [n for pair in PAIRS for n in pair]
        adapters = {n: load(n, models_dir, ctc_dir, root, device) for n in names}
        best: dict[str, float] = {}
        outputs: dict[str, list[dict[str, Any]]] = {}
        for adapter in adapters.values():  # warm-up: one short file
            transcribe(adapter, files[:1])
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                seconds, outputs[name] = transcribe(adapters[name], files)
                best[name] = min(best.get(name, seconds), seconds)
                print(f"round {r + 1} {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
        norm = normaliser()
        rows = []
        for name in names:
            audio_s = sum(float(o["duration_s"]) for o in outputs[name])
            model = adapters[name].model
            whisper = name not in CTC_SHAPES
            texts = [str(o["transcript"]) for o in outputs[name]]
            rows.append(
                {
                    "model": name,
                    "kind": "whisper" if whisper else "ctc",
                    "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                    "files": len(files),
                    "audio_s": round(audio_s, 1),
                    "wall_s": round(best[name], 2),
                    "rtf": round(best[name] / audio_s, 4),
                    "wer": round(corpus_wer([t for _, t in files], texts, norm), 3)
                    if whisper
                    else None,
                }
            )
            adapters[name].unload()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':22} {'kind':8} {'params':>7} {'audio s':>8} {'wall s':>7} {'RTF':>7} {'WER':>6}"
    )
    for r in rows:
        wer = "-" if r["wer"] is None else f"{r['wer']:.3f}"
        print(
            f"{r['model']:22} {r['kind']:8} {r['params_m']:6.1f}M {r['audio_s']:8.1f} "
            f"{r['wall_s']:7.2f} {r['rtf']:7.4f} {wer:>6}"
        )
    by = {r["model"]: r for r in rows}
    for whisper, ctc in PAIRS:
        w, c = by[whisper], by[ctc]
        print(
            f"{ctc} ({c['params_m']}M) / {whisper} ({w['params_m']}M): RTF ratio "
            f"{c['rtf'] / w['rtf']:.3f} (below 1: the CTC model is faster)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=2, help="runs per model; the best counts")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    ap.add_argument("--models-dir", type=Path, help="default FLEET_MODELS_DIR")
    ap.add_argument("--ctc-dir", type=Path, help="random CTC models (default MODELS_DIR/bench-ctc)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", action="store_true", help="rows as JSON lines, no table")
    args = ap.parse_args()

    import torch

    from config.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    models_dir = args.models_dir or Settings().resolved_models_dir
    rows = measure(models_dir, args.ctc_dir or models_dir / "bench-ctc", args.rounds, args.device)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"device={args.device} torch_threads={torch.get_num_threads()} rounds={args.rounds}")
    print_table(rows)


if __name__ == "__main__":
    main()
