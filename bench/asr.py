"""Word error rate of each transcribe tier on real recorded speech, batched vs one
file at a time, with the real-time factor.

    .venv/bin/python -m bench.asr [--asterisk 40 | --all] [--tiers whisper-base,whisper-tiny.en]
                                  [--models-dir DIR] [--threads N] [--json]
                                  [--sets asterisk,...] [--modes batched|one-file]

Speech (Debian packages, installed by ./scripts/install.sh; none of it was seen
when the fleet's thresholds were chosen, and Whisper was not trained on these
transcripts):

  librivox    pocketsphinx-testdata: five sentences of LibriVox read speech
              (Sense and Sensibility), 16 kHz, transcripts in `transcription`;
  cards       pocketsphinx-testdata: five short spoken card names, `cards.transcription`;
  asterisk    asterisk-core-sounds-en-wav: one speaker's 8 kHz telephone prompts,
              transcripts in asterisk-core-sounds-en's core-sounds-en.txt.gz. A
              seeded sample of --asterisk files by default, every one with --all;
  non-speech  the same package's entries whose transcript is only a bracketed or
              parenthesised description (silence, beeps, tones, monkeys): every
              one should end with an empty transcript and no_speech: true.

Text is normalised by Whisper's EnglishTextNormalizer (as shipped in
transformers; numbers to digits, punctuation and case dropped, no British
spelling map) on both sides, and the corpus WER is jiwer's (word-level
Levenshtein distance over reference words). Bracketed and parenthesised notes
in the asterisk transcripts ("[@]", "(simple tone sound plays)") are removed.

Each tier is loaded once (converted into --models-dir by `fleet models prepare`
when missing). Per set, the two modes run on the same loaded model, in
alternating order from one tier to the next:

  batched   `adapter.predict` over every file of the set at once: all windows
            in generate calls of up to max_chunks_per_forward (the worker's way);
  one-file  `adapter.predict([file])` per file, as a script looping over files would.

Both include decoding and resampling. RTF = wall seconds / audio seconds (lower
is faster; every window is padded to Whisper's 30 s, so short prompts cost as
much as 30 s of speech).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
ASTERISK = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TEXT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
TIERS = ("whisper-base", "whisper-tiny.en")
DEB_HINT = (
    "install the Debian packages pocketsphinx-testdata, asterisk-core-sounds-en-wav and "
    "asterisk-core-sounds-en (./scripts/install.sh does)"
)


@dataclass(frozen=True)
class Recording:
    """A recording (`uri` relative to its set's root) and what is said in it
    ("" for a non-speech entry)."""

    uri: str
    text: str


@dataclass
class SpeechSet:
    name: str
    root: Path
    items: list[Recording] = field(default_factory=list)
    speech: bool = True  # False: nothing should be transcribed


def _sphinx(folder: str, transcript: str) -> SpeechSet:
    """Lines `<s> words </s> (fileid)` -> recordings `<folder>/<fileid>.wav`."""
    root = POCKETSPHINX / folder
    out = SpeechSet(folder, root)
    for line in (root / transcript).read_text().splitlines():
        m = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*$", line)
        if m and (root / f"{m.group(2)}.wav").is_file():
            out.items.append(Recording(f"{m.group(2)}.wav", " ".join(m.group(1).split())))
    return out


def _asterisk() -> tuple[SpeechSet, SpeechSet]:
    """(speech, non-speech) sets from core-sounds-en.txt.gz `name: text` lines."""
    speech, other = SpeechSet("asterisk", ASTERISK), SpeechSet("non-speech", ASTERISK, speech=False)
    for line in gzip.decompress(ASTERISK_TEXT.read_bytes()).decode("utf-8", "replace").splitlines():
        name, sep, text = line.partition(":")
        if not sep or line.startswith(";") or not (ASTERISK / f"{name.strip()}.wav").is_file():
            continue
        said = " ".join(re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text).split())
        target = speech if said else other
        target.items.append(Recording(f"{name.strip()}.wav", said))
    return speech, other


def load_sets(asterisk_sample: int | None, seed: int = 0) -> list[SpeechSet]:
    """The four sets; `asterisk_sample` files of the asterisk set (None: all)."""
    missing = [p for p in (POCKETSPHINX, ASTERISK, ASTERISK_TEXT) if not p.exists()]
    if missing:
        raise SystemExit(f"{', '.join(map(str, missing))} not found: {DEB_HINT}")
    librivox = _sphinx("librivox", "transcription")
    cards = _sphinx("cards", "cards.transcription")
    asterisk, non_speech = _asterisk()
    if asterisk_sample is not None and asterisk_sample < len(asterisk.items):
        asterisk.items = sorted(
            random.Random(seed).sample(asterisk.items, asterisk_sample), key=lambda r: r.uri
        )
    return [librivox, cards, asterisk, non_speech]


def normaliser() -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def corpus_wer(refs: list[str], hyps: list[str], norm: Any) -> float:
    """jiwer's corpus WER after normalising both sides; empty references are skipped."""
    import jiwer

    pairs = [(norm(r), norm(h)) for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


@dataclass
class Run:
    seconds: float
    outputs: list[dict[str, Any]]


def _outputs(preds: list[Any], uris: list[str]) -> list[dict[str, Any]]:
    out = []
    for uri, p in zip(uris, preds, strict=True):
        if getattr(p, "output", None) is None:
            raise SystemExit(f"{uri} failed: {p}")
        out.append(p.output)
    return out


def run_set(adapter: Any, s: SpeechSet, mode: str) -> Run:
    """Transcribe every recording of `s` in one predict call (batched) or one call
    per file; returns wall seconds and the outputs in order."""
    from workers.adapters.base import Source

    adapter.audio_root = s.root
    sources = [Source(i, "audio", r.uri, {"uri": r.uri}) for i, r in enumerate(s.items)]
    uris = [r.uri for r in s.items]
    started = time.perf_counter()
    if mode == "batched":
        preds = adapter.predict([adapter.prepare(src) for src in sources])
    else:
        preds = [adapter.predict([adapter.prepare(src)])[0] for src in sources]
    return Run(time.perf_counter() - started, _outputs(preds, uris))


def _load(tier: str, models_dir: Path) -> Any:
    from config.taskconfig import TierSpec
    from fleet.models.prepare import prepare_models
    from workers.adapters.transcribe import TranscribeAdapter

    for _name, path, took in prepare_models(models_dir, only=[tier], echo=lambda m: None):
        print(f"{tier}: ready in {path} ({took:.1f} s)", file=sys.stderr)
    adapter = TranscribeAdapter(audio_root=models_dir)
    adapter.load(TierSpec(name=tier, path=tier, dtype="auto"), str(models_dir / tier), "cpu")
    return adapter


def measure(
    sets: list[SpeechSet],
    tiers: list[str],
    models_dir: Path,
    modes: tuple[str, ...] = ("batched", "one-file"),
) -> list[dict[str, Any]]:
    """One row per (set, tier): WER, no-speech counts, each mode's seconds and RTF
    (a mode not run reads as the batched one)."""
    norm = normaliser()
    rows: list[dict[str, Any]] = []
    for t, tier in enumerate(tiers):
        adapter = _load(tier, models_dir)
        warm = sets[0]
        run_set(adapter, SpeechSet(warm.name, warm.root, warm.items[:1]), "batched")
        for s in sets:
            order = list(modes) if t % 2 == 0 else list(modes)[::-1]
            runs: dict[str, Run] = {}
            for mode in order:
                print(f"{tier} {s.name} {mode}: {len(s.items)} files ...", file=sys.stderr)
                runs[mode] = run_set(adapter, s, mode)
                print(f"  {runs[mode].seconds:.1f} s", file=sys.stderr, flush=True)
            runs.setdefault("batched", runs[order[0]])
            runs.setdefault("one-file", runs["batched"])
            refs = [r.text for r in s.items]
            texts = {m: [str(o["transcript"]) for o in r.outputs] for m, r in runs.items()}
            audio_s = sum(float(o["duration_s"]) for o in runs["batched"].outputs)
            no_speech = sum(bool(o.get("no_speech")) for o in runs["batched"].outputs)
            rows.append(
                {
                    "set": s.name,
                    "tier": tier,
                    "files": len(s.items),
                    "audio_s": round(audio_s, 1),
                    "wer": round(corpus_wer(refs, texts["batched"], norm), 4) if s.speech else None,
                    "wer_one_file": round(corpus_wer(refs, texts["one-file"], norm), 4)
                    if s.speech
                    else None,
                    "no_speech": no_speech,
                    "same_text": sum(
                        a == b for a, b in zip(texts["batched"], texts["one-file"], strict=True)
                    ),
                    "batched_s": round(runs["batched"].seconds, 2),
                    "one_file_s": round(runs["one-file"].seconds, 2),
                    "rtf_batched": round(runs["batched"].seconds / audio_s, 3),
                    "rtf_one_file": round(runs["one-file"].seconds / audio_s, 3),
                    "languages": sorted(
                        {str(o["language"]) for o in runs["batched"].outputs if o.get("language")}
                    ),
                }
            )
        adapter.unload()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'set':11} {'tier':16} {'files':>5} {'audio s':>8} {'WER':>7} {'no-speech':>9} "
        f"{'batched s':>9} {'one-file s':>10} {'RTF b':>6} {'RTF 1':>6} {'b/1':>5} {'same':>5}"
    )
    print(head)
    for r in rows:
        wer = "-" if r["wer"] is None else f"{r['wer']:.3f}"
        print(
            f"{r['set']:11} {r['tier']:16} {r['files']:5d} {r['audio_s']:8.1f} {wer:>7} "
            f"{r['no_speech']:>4d}/{r['files']:<4d} {r['batched_s']:9.1f} {r['one_file_s']:10.1f} "
            f"{r['rtf_batched']:6.3f} {r['rtf_one_file']:6.3f} "
            f"{r['one_file_s'] / r['batched_s']:5.2f} {r['same_text']:>5d}"
        )
    by = {(r["set"], r["tier"]): r for r in rows}
    for name in dict.fromkeys(r["set"] for r in rows):
        base, tiny = by.get((name, "whisper-base")), by.get((name, "whisper-tiny.en"))
        if base and tiny and base["wer"] is not None:
            verdict = "below" if base["wer"] < tiny["wer"] else "NOT below"
            print(
                f"{name}: whisper-base WER {base['wer']:.3f} is {verdict} tiny.en's {tiny['wer']:.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--asterisk", type=int, default=40, help="asterisk files sampled (seeded)")
    ap.add_argument("--all", action="store_true", help="every asterisk recording")
    ap.add_argument("--tiers", default=",".join(TIERS), help="comma-separated model folders")
    ap.add_argument("--models-dir", type=Path, help="default FLEET_MODELS_DIR")
    ap.add_argument("--json", action="store_true", help="rows as JSON lines, no table")
    ap.add_argument("--sets", help="comma-separated subset of librivox,cards,asterisk,non-speech")
    ap.add_argument(
        "--modes", default="batched,one-file", help="batched, one-file or both (the default)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default torch's). On a machine shared with other work, 1 "
        "avoids OpenMP threads waiting on each other: 15x faster here at load average 14",
    )
    args = ap.parse_args()
    if args.asterisk < 1:
        ap.error("--asterisk must be at least 1")

    import torch

    from config.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)

    models_dir = args.models_dir or Settings().resolved_models_dir
    sets = load_sets(None if args.all else args.asterisk)
    if args.sets:
        wanted = {n.strip() for n in args.sets.split(",")}
        sets = [s for s in sets if s.name in wanted]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not sets or not modes or set(modes) - {"batched", "one-file"}:
        ap.error("--sets names no set, or --modes is not batched and/or one-file")
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    rows = measure(sets, tiers, models_dir, modes)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(
        f"torch_threads={torch.get_num_threads()} asterisk={'all' if args.all else args.asterisk}"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
