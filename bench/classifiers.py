"""Accuracy and training time of the bundled classifiers (intent, worthiness, sentiment).

    .venv/bin/python -m bench.classifiers [--models-dir DIR] [--only intent,sentiment]
        [--intent-baseline REV]

Trains each bundled classifier the way `fleet models prepare` does (MiniLM, the
shipped training file, an 80/20 stratified split with seed 0, early stopping on
the split) into --models-dir, and prints per task: the split's accuracy and
macro-F1, the same on the independent evaluation file (config/data/eval/, written
apart from the training file), epochs and training seconds. The sum of the
seconds is what `fleet models prepare` spends training on this machine.

--intent-baseline REV also trains intent from the training file as it was at git
revision REV, in the same run, and scores it on the same independent set: what
the data change bought, measured side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _row(name: str, m: dict[str, Any], seconds: float) -> str:
    t = m.get("test") or {}
    ind = f"{t['accuracy']:.3f} | {t['macro_f1']:.3f} | {t['n']}" if t else "- | - | -"
    return (
        f"| {name} | {m['n_train']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['n_test']} | "
        f"{ind} | {m['epochs_run']} (best {m['best_epoch']}) | {seconds:.0f} |"
    )


def main() -> int:
    from transformers.utils import logging as hf_logging

    from config.data import data_path
    from config.taskconfig import load_tasks
    from fleet.models.catalogue import BUNDLED, INTENT
    from fleet.models.finetune import TrainConfig
    from fleet.models.labeled import load_labeled
    from fleet.models.prepare import train_bundled
    from fleet.models.training import run_training

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--models-dir", type=Path, help="Where to write the models (default: a temp dir)."
    )
    ap.add_argument("--only", default="", help="Comma-separated tasks (default: all three).")
    ap.add_argument("--intent-baseline", metavar="REV", help="Also train intent from REV's data.")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="bench-classifiers-"))
    models_dir.mkdir(parents=True, exist_ok=True)
    wanted = {t for t in args.only.split(",") if t}
    rows, total = [], 0.0
    for b in BUNDLED.values():
        if wanted and b.task not in wanted:
            continue
        started = time.perf_counter()
        m = train_bundled(models_dir, b, echo=lambda line: None, quiet=True)
        took = time.perf_counter() - started
        total += took
        rows.append(_row(f"{b.task} ({b.data})", m, took))
        print(rows[-1], flush=True)
    if args.intent_baseline:
        # The set lives in config/data; commits before that move kept it in fleet/data.
        shown = [
            subprocess.run(
                ["git", "show", f"{args.intent_baseline}:{folder}/intent.jsonl"],
                cwd=REPO,
                capture_output=True,
            )
            for folder in ("config/data", "fleet/data")
        ]
        found = next((s for s in shown if s.returncode == 0), None)
        if found is None:
            raise SystemExit(shown[-1].stderr.decode(errors="replace"))
        old = found.stdout
        data = models_dir / f"intent-{args.intent_baseline}.jsonl"
        data.write_bytes(old)
        started = time.perf_counter()
        m = run_training(
            load_tasks(None)["intent"],
            models_dir=models_dir,
            examples=load_labeled(data),
            data_name=data.name,
            out=models_dir / f"intent-minilm-{args.intent_baseline}",
            base=None,
            eval_file=None,
            test_file=data_path(BUNDLED[INTENT].eval),
            config=TrainConfig(),
            test_fraction=0.2,
            quiet=True,
        )
        rows.append(
            _row(f"intent, data of {args.intent_baseline}", m, time.perf_counter() - started)
        )
        print(rows[-1], flush=True)
    print()
    print(
        "| model | train n | split accuracy | split macro-F1 | split n | independent accuracy | "
        "independent macro-F1 | independent n | epochs | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\ntraining the bundled classifiers took {total:.0f} s; models in {models_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
