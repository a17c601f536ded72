"""Accuracy and calibration of the bundled classifiers on the evaluation sets, side by side.

    .venv/bin/python -m bench.confidence [--models-dir DIR] [--tasks intent,sentiment,...]
        [--sets first,personas] [--json]

For each task and each evaluation set under fleet/data/eval/ (`first`: the
`*_eval.jsonl` sets; `personas`: the `*_personas.jsonl` sets written later by a
planned persona/topic/length grid; `grid`: the `*_grid.jsonl` sets, planned as
registers x lengths x failure shapes and written in voices unlike the training
files; fleet/data/eval/README.md), prints n,
accuracy, and the expected calibration error (10 equal-width bins) of the
confidence before and after calibration:

- intent, sentiment, worthiness (sequence_classify): raw softmax (T = 1) against
  the temperature in the folder's calibration.json (fitted by `fleet train` on its
  held-out split of the training file);
- topic (zero-shot MiniLM similarity, scored on the intent sets): the temperature
  the task used before fitting (0.05) against the one tasks.toml serves now
  (fitted by `fleet calibrate --task topic --data fleet/data/intent.jsonl`);
- llm_classify (SmolLM2 label scoring, intent sets): its label distribution
  after contextual calibration (Zhao et al. 2021) as served; no temperature.

Nothing here fits or chooses anything: the evaluation sets are only scored.
Models come from --models-dir (default FLEET_MODELS_DIR); run
`fleet models prepare` first. CPU, in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "fleet" / "data" / "eval"
SETS = {"first": "{}_eval.jsonl", "personas": "{}_personas.jsonl", "grid": "{}_grid.jsonl"}
TASKS = ("intent", "sentiment", "worthiness", "topic", "llm_classify")
FOLDERS = {
    "intent": "intent-minilm",
    "sentiment": "sentiment-minilm",
    "worthiness": "worthiness-minilm",
}
TOPIC_TEMPERATURE_BEFORE = 0.05  # the zero-shot default before a temperature was fitted


def score_task(task: str, file: Path, models_dir: Path) -> dict[str, Any]:
    """n, accuracy, ece_before, ece_after, temperature (and the per-item rows) of one task
    on one labeled file."""
    from fleet.config.taskconfig import load_tasks
    from fleet.models.labeled import load_labeled
    from fleet.models.temperature import adapter_log_scores, calibration_scores, folder_logits
    from workers.calibration import read_calibration, softmax

    examples = load_labeled(file)
    texts = [ex.text for ex in examples]
    if task in FOLDERS:
        folder = models_dir / FOLDERS[task]
        logits, names = folder_logits(folder, texts, max_length=256)
        cal = read_calibration(folder)
        before, after = 1.0, cal.temperature if cal else 1.0
    else:
        spec = load_tasks(None)[task]
        if task == "topic":
            logits, names = adapter_log_scores(
                spec, models_dir, texts, options={"temperature": 1.0}
            )
            before, after = TOPIC_TEMPERATURE_BEFORE, float(spec.options["temperature"])
        else:
            logits, names = adapter_log_scores(spec, models_dir, texts)
            before = after = 1.0
    gold = [names.index(ex.label) for ex in examples]
    s = calibration_scores(logits, gold, before)
    t = calibration_scores(logits, gold, after)
    rows = [
        {
            "gold": names[g],
            "predicted": names[max(range(len(r)), key=r.__getitem__)],
            "confidence": max(softmax(r, after)),
        }
        for r, g in zip(logits, gold, strict=True)
    ]
    return {
        "task": task,
        "set": file.name,
        "n": s["n"],
        "accuracy": s["accuracy"],
        "ece_before": s["ece_after"],
        "ece_after": t["ece_after"],
        "temperature_before": before,
        "temperature": after,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--json", action="store_true", help="one JSON line per task and set")
    args = ap.parse_args(argv)
    from fleet.config.settings import Settings

    models_dir = args.models_dir or Settings().resolved_models_dir
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results = []
    for task in args.tasks.split(","):
        data = "intent" if task in ("topic", "llm_classify") else task
        for name in args.sets.split(","):
            file = EVAL / SETS[name].format(data)
            print(f"scoring {task} on {file.name} ...", file=sys.stderr, flush=True)
            r = score_task(task, file, models_dir)
            results.append(r)
            if args.json:
                print(json.dumps({k: v for k, v in r.items() if k != "rows"}), flush=True)
    if not args.json:
        print("| task | set | n | accuracy | ECE before | ECE after | temperature |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(
                f"| {r['task']} | {r['set']} | {r['n']} | {r['accuracy']:.3f} | "
                f"{r['ece_before']:.3f} | {r['ece_after']:.3f} | "
                f"{r['temperature_before']:g} -> {r['temperature']:.4g} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
