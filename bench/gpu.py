"""The GPU check: one command, one JSON of figures, on a machine with a CUDA GPU.

    .venv/bin/python -m bench.gpu [--out gpu-figures.json] [--gpu 0] [--quick]

(`scripts/gpu-check.sh` installs a CUDA build of torch and runs this.) Steps,
each in its own subprocess with a time limit, so one failure is recorded and
the others still run (about 6 to 8 minutes on one H100/H200):

  gpu_tests     pytest tests/gpu: a real CUDA out-of-memory forcing the
                runtime to halve its budget, then step down the ladder
  overhead_*    bench.overhead on the GPU in bf16: the fleet (real worker,
                Postgres, Redis) vs the bare model, for a MiniLM-L6 and a
                BERT-base shaped classifier (random weights: real cost)
  ceiling       bench.ceiling: the fleet's own ceiling with the fake model at
                zero and 50 us/item, 1 and 4 workers
  whisper       Whisper batched across files vs one file at a time on the GPU,
                with a whisper-small shaped model (random weights), espeak-ng speech

Needs Postgres and Redis as the benchmarks do (TEST_ADMIN_DATABASE_URL /
TEST_REDIS_URL, default 127.0.0.1). Prints a summary and writes every figure,
the device name and each step's output tail to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _step(name: str, argv: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    print(f"[gpu-check] {name}: {' '.join(argv[2:])}", flush=True)
    try:
        out = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
    seconds = round(time.monotonic() - started, 1)
    print(f"[gpu-check] {name}: exit {rc} in {seconds} s", flush=True)
    return {"rc": rc, "seconds": seconds, "tail": text[-3000:]}


def _device() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": p.name,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
    }


def whisper_small(gpu: int | None, files: int) -> dict[str, Any]:
    """Batched vs one-file Whisper speed on the GPU with whisper-small shapes.

    The model is built from a WhisperConfig of whisper-small's sizes (244M) with
    random weights and the bundled Whisper base's tokenizer and feature extractor
    (same multilingual vocabulary); generation is capped at 64 new tokens (the
    tier's max_new_tokens option), the
    same in both modes, so the figure is the batching's, not the text's.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    import torch

    device = "cpu" if gpu is None else "cuda"

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from bench.whisper_rtf import make_clips
    from config.settings import Settings
    from config.taskconfig import TaskSpec, TierSpec
    from fleet.models.convert.whisper_ct2 import prepare_whisper_base
    from workers.adapters.base import Source
    from workers.adapters.transcribe import TranscribeAdapter
    from workers.runtime import ModelRuntime

    base = prepare_whisper_base(Settings().resolved_models_dir)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "whisper-small-random"
        cfg = WhisperConfig.from_pretrained(base)
        for k, v in {
            "d_model": 768,
            "encoder_layers": 12,
            "decoder_layers": 12,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
        }.items():
            setattr(cfg, k, v)
        WhisperForConditionalGeneration(cfg).save_pretrained(folder)
        for f in Path(base).iterdir():
            if f.suffix in (".json", ".txt") and f.name not in ("config.json",):
                (folder / f.name).write_bytes(f.read_bytes())
        clips = make_clips(root, files)
        audio_s = sum(c.seconds for c in clips)
        sources = [
            Source(i, "audio", c.uri, {"uri": c.uri, "duration_s": c.seconds})
            for i, c in enumerate(clips)
        ]
        tier = TierSpec(
            name="whisper-small-random",
            path=str(folder),
            dtype="bfloat16" if device == "cuda" else "float32",
            max_batch_tokens=48000,
            options={"max_new_tokens": 64},  # a random model never stops by itself
        )
        spec = TaskSpec("transcribe", "transcribe", "audio", (tier,))
        adapter = TranscribeAdapter(audio_root=root)
        runtime = ModelRuntime(spec, adapter, models_dir=root, device=device, start_at=0)
        runtime.start()
        adapter.predict([adapter.prepare(sources[0])])  # warm-up
        sync()
        t = time.perf_counter()
        runtime.run(sources)
        sync()
        batched = time.perf_counter() - t
        t = time.perf_counter()
        for src in sources:
            adapter.predict([adapter.prepare(src)])
        sync()
        one = time.perf_counter() - t
        runtime.stop()
    return {
        "files": len(clips),
        "audio_seconds": round(audio_s, 1),
        "batched_audio_s_per_s": round(audio_s / batched, 2),
        "one_file_audio_s_per_s": round(audio_s / one, 2),
        "batched_over_one_file": round(one / batched, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("gpu-figures.json"))
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a first look)")
    ap.add_argument("--whisper-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test only
    args = ap.parse_args()
    if args.whisper_only:
        files = 2 if args.cpu else 8 if args.quick else 16
        print(json.dumps(whisper_small(None if args.cpu else args.gpu, files)))
        return
    py = [sys.executable, "-m"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    items = "5000" if args.quick else "20000"
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    figures: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "device": _device(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    steps: dict[str, Any] = {}
    steps["gpu_tests"] = _step(
        "gpu_tests", [*py, "pytest", "-q", "-m", "gpu", "tests/gpu"], 180, env
    )
    for shape in ("minilm", "bert-base"):
        out = tmp / f"overhead-{shape}.json"
        steps[f"overhead_{shape}"] = _step(
            f"overhead_{shape}",
            [
                *py,
                "bench.overhead",
                *("--items", items, "--gpu", str(args.gpu), "--shape", shape),
                *("--dtype", "bfloat16", "--batch-tokens", "65536", "--skip-pipeline1"),
                *("--json-out", str(out)),
            ],
            150,
            env,
        )
        if out.exists():
            steps[f"overhead_{shape}"]["figures"] = json.loads(out.read_text())
    out = tmp / "ceiling.json"
    steps["ceiling"] = _step(
        "ceiling",
        [*py, "bench.ceiling", "--items", items, "--workers", "1,4", "--json-out", str(out)],
        180,
        env,
    )
    if out.exists():
        steps["ceiling"]["figures"] = json.loads(out.read_text())
    w = _step(
        "whisper",
        [*py, "bench.gpu", "--whisper-only", "--gpu", str(args.gpu), *(["--quick"] * args.quick)],
        120,
        env,
    )
    try:
        w["figures"] = json.loads(w["tail"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    steps["whisper"] = w
    figures["steps"] = steps
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"[gpu-check] figures in {args.out}")
    for name, step in steps.items():
        print(
            f"  {name:18} exit {step['rc']:3}  {step['seconds']:6.1f} s  {step.get('figures', '')}"
        )
    sys.exit(0 if all(s["rc"] == 0 for s in steps.values()) else 1)


if __name__ == "__main__":
    main()
