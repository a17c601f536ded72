"""Whisper speed: many files' chunks batched together (the fleet's way) vs one
file at a time, as audio seconds per wall second (the real-time factor's inverse).

    .venv/bin/python -m bench.whisper_rtf [--files 16] [--rounds 2] [--models-dir DIR]

Speech: espeak-ng speaks the sentences of config/data/sample_speech.txt, alone
and strung together, into files of about 3 s to 90 s (half of them longer than
Whisper's 30 s window, so they are cut into chunks), with four voices and three
speeds. Model: the first tier of the bundled transcribe task (Whisper base;
tiny.en with --tier 1), converted once by fleet.models.convert.whisper_ct2 into
--models-dir (default FLEET_MODELS_DIR). Both modes run in this process on
the same loaded model and the same files, in alternating order per round:

  batched   the worker's path: `ModelRuntime.run` with the bundled transcribe
            task's tier, all files in one batch message: files packed into
            sub-batches under the tier's audio budget, the chunks of every file
            in a sub-batch transcribed together (up to max_chunks_per_forward
            per generate call);
  one-file  `adapter.prepare` then `adapter.predict([file])` for each file, as a
            script looping over files would (a long file's own chunks still go
            through the model together).

Both include decoding and resampling the audio. Prints both speeds (per wall
second, and per CPU second of this process, which a busy machine disturbs
less), their ratio, how many words of the two modes' transcripts agree, and
each mode's word error rate against the text espeak-ng was given.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENTENCES_FILE = REPO / "config" / "data" / "sample_speech.txt"
SENTENCE_COUNTS = (1, 2, 3, 5, 9, 14, 20, 28)  # about 3 s each: 3 s to 90 s files
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-029")
SPEEDS = (150, 175, 200)  # words per minute


@dataclass(frozen=True)
class Clip:
    uri: str
    text: str
    seconds: float


def sentences() -> list[str]:
    return [
        line.split("\t")[0].strip()
        for line in SENTENCES_FILE.read_text().splitlines()
        if line.strip()
    ]


def make_clips(root: Path, files: int) -> list[Clip]:
    """Speak `files` clips into `root` with espeak-ng."""
    import soundfile as sf

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not on PATH: install it (apt-get install -y espeak-ng)")
    pool = sentences()
    clips = []
    for i in range(files):
        n = SENTENCE_COUNTS[i % len(SENTENCE_COUNTS)]
        text = " ".join(pool[(i + k) % len(pool)] for k in range(n))
        name = f"clip{i:03d}.wav"
        subprocess.run(
            [
                espeak,
                "-v",
                VOICES[i % len(VOICES)],
                "-s",
                str(SPEEDS[i % len(SPEEDS)]),
                "-w",
                str(root / name),
                text,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        clips.append(Clip(name, text, sf.info(str(root / name)).duration))
    return clips


def normalize(text: str) -> list[str]:
    """Lowercased words without punctuation ("it's" -> "its", "follow-up" -> "follow up")."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word-level edit distance, words in the reference)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1], len(ref)


def agreement(refs: list[str], hyps: list[str]) -> float:
    """1 - total word edit distance / total reference words."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        e, n = word_errors(ref, hyp)
        errors, words = errors + e, words + n
    return 1 - errors / max(words, 1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=16, help="number of speech files")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode (median shown)")
    ap.add_argument("--models-dir", type=Path, help="where the Whisper models are (or go)")
    ap.add_argument("--tier", type=int, default=0, help="transcribe ladder tier to start on")
    args = ap.parse_args()
    if args.files < 1 or args.rounds < 1:
        ap.error("--files and --rounds must be at least 1")

    import torch

    from config.settings import Settings
    from config.taskconfig import get_task, load_tasks
    from fleet.models.convert.whisper_ct2 import prepare_whisper, prepare_whisper_base
    from workers.adapters.base import Source
    from workers.adapters.transcribe import TranscribeAdapter
    from workers.runtime import ModelRuntime

    models_dir = args.models_dir or Settings().resolved_models_dir
    started = time.perf_counter()
    prepare_whisper_base(models_dir)
    prepare_whisper(models_dir)
    print(f"model ready in {models_dir} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    spec = get_task(load_tasks(), "transcribe")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        clips = make_clips(root, args.files)
        audio_s = sum(c.seconds for c in clips)
        sources = [
            Source(i, "audio", c.uri, {"uri": c.uri, "duration_s": c.seconds})
            for i, c in enumerate(clips)
        ]
        adapter = TranscribeAdapter(audio_root=root)
        runtime = ModelRuntime(
            spec, adapter, models_dir=models_dir, device="cpu", start_at=args.tier
        )
        runtime.start()

        def batched() -> list[str]:
            results, _ = runtime.run(sources)
            return [
                ""
                if r.prediction is None or r.prediction.output is None
                else str(r.prediction.output["transcript"])
                for r in results
            ]

        def one_file() -> list[str]:
            out = []
            for src in sources:
                (pred,) = adapter.predict([adapter.prepare(src)])
                if not hasattr(pred, "output") or pred.output is None:
                    raise SystemExit(f"{src.external_id} failed: {pred}")
                out.append(str(pred.output["transcript"]))
            return out

        modes = {"batched": batched, "one-file": one_file}
        adapter.predict([adapter.prepare(sources[0])])  # warm-up: first-call set-up
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        texts: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
                c, t = time.process_time(), time.perf_counter()
                texts[mode] = modes[mode]()
                seconds[mode].append(time.perf_counter() - t)
                cpu[mode].append(time.process_time() - c)
                print(
                    f"  round {r + 1} {mode}: {seconds[mode][-1]:.1f} s wall, "
                    f"{cpu[mode][-1]:.1f} s CPU",
                    file=sys.stderr,
                    flush=True,
                )
        runtime.stop()

    speed = {m: audio_s / statistics.median(s) for m, s in seconds.items()}
    tier = spec.ladder[runtime.tier if runtime.tier >= 0 else 0]
    print(
        f"files={len(clips)} audio={audio_s:.0f} s ({min(c.seconds for c in clips):.1f}-"
        f"{max(c.seconds for c in clips):.1f} s, {sum(c.seconds > 30 for c in clips)} over 30 s) "
        f"model={tier.name} budget={tier.max_batch_tokens} cs "
        f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} rounds={args.rounds}"
    )
    per_cpu = {m: audio_s / statistics.median(s) for m, s in cpu.items()}
    for mode in modes:
        print(
            f"{mode:9} {speed[mode]:7.2f} audio s per wall s  (RTF {1 / speed[mode]:.3f}, "
            f"median {statistics.median(seconds[mode]):.1f} s)   "
            f"{per_cpu[mode]:6.2f} audio s per CPU s"
        )
    print(
        f"batched / one-file   {speed['batched'] / speed['one-file']:.2f}x wall, "
        f"{per_cpu['batched'] / per_cpu['one-file']:.2f}x CPU"
    )
    print(f"word agreement between the modes  {agreement(texts['one-file'], texts['batched']):.4f}")
    refs = [c.text for c in clips]
    for mode in modes:
        print(f"WER vs spoken text, {mode:9} {1 - agreement(refs, texts[mode]):.4f}")


if __name__ == "__main__":
    main()
