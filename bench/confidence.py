"""Accuracy and calibration of the bundled classifiers on the evaluation sets, side by side.

    .venv/bin/python -m bench.confidence [--models-dir DIR] [--tasks intent,sentiment,...]
        [--sets first,personas] [--json]

For each task and each evaluation set under config/data/eval/ (`first`: the
`*_eval.jsonl` sets; `personas`: the `*_personas.jsonl` sets written later by a
planned persona/topic/length grid; `grid`: the `*_grid.jsonl` sets, planned as
registers x lengths x failure shapes and written in voices unlike the training
files; config/data/eval/README.md; `outside`, only when named: the outside-style
files under config/data, see OUTSIDE), prints n,
accuracy, and the expected calibration error (10 equal-width bins) of the
confidence before and after calibration:

- intent, sentiment, worthiness (sequence_classify): raw softmax (T = 1) against
  the temperature in the folder's calibration.json (fitted by `fleet train` on its
  held-out split of the training file);
- topic (zero-shot MiniLM similarity, scored on the intent sets): the temperature
  the task used before fitting (0.05) against the temperature and per-label bias
  tasks.toml serves now (fitted by `fleet calibrate --task topic --data
  config/data/intent.jsonl`; a bias can move the label, so accuracy has a before
  and an after);
- llm_classify (SmolLM2 label scoring, intent sets): its label distribution after
  contextual calibration (Zhao et al. 2021) against the one served now (the fitted
  temperature and label bias when tasks.toml has them).

With more than one set, a last row per task pools every set's items (ECE over more
items has less binning noise). "ECE floor": the mean ECE a perfectly calibrated model
with the same confidences would show on the same number of items (each item right
with probability equal to its confidence, 400 draws): the noise level of the figure.

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

from config.data import data_path

EVAL = data_path("eval")  # config/data/eval
SETS = {"first": "{}_eval.jsonl", "personas": "{}_personas.jsonl", "grid": "{}_grid.jsonl"}
# `--sets outside` (not in the default or the pooled row): ordinary text written in
# many voices apart from the training files and the evaluation sets, under
# config/data; sentiment's is the file its temperature is fitted on.
OUTSIDE = {
    "intent": "intent_outside.jsonl",
    "worthiness": "worthiness_outside.jsonl",
    "sentiment": "sentiment_calibration.jsonl",
}
TASKS = ("intent", "sentiment", "worthiness", "topic", "llm_classify")
FOLDERS = {
    "intent": "intent-minilm",
    "sentiment": "sentiment-minilm",
    "worthiness": "worthiness-minilm",
}
TOPIC_TEMPERATURE_BEFORE = 0.05  # the zero-shot default before a temperature was fitted


def score_task(task: str, file: Path, models_dir: Path) -> dict[str, Any]:
    """n, accuracy and ECE before and after, the scaling (and the per-item rows) of one
    task on one labeled file."""
    from config.taskconfig import load_tasks
    from fleet.models.labeled import load_labeled
    from fleet.models.temperature import (
        RAW_OPTIONS,
        adapter_log_scores,
        calibration_scores,
        folder_logits,
        scaled_probs,
    )
    from workers.calibration import read_calibration

    examples = load_labeled(file)
    texts = [ex.text for ex in examples]
    bias: list[float] | None = None
    if task in FOLDERS:
        folder = models_dir / FOLDERS[task]
        logits, names = folder_logits(folder, texts, max_length=256)
        cal = read_calibration(folder)
        gold = [names.index(ex.label) for ex in examples]
        before_logits, before = logits, 1.0
        after = cal.temperature if cal else 1.0
        scaling = f"T 1 -> {after:.4g}"
    else:
        spec = load_tasks(None)[task]
        names = list(spec.labels)
        gold = [names.index(ex.label) for ex in examples]
        if task == "topic":
            logits, _ = adapter_log_scores(spec, models_dir, texts, options=RAW_OPTIONS[spec.kind])
            before_logits, before = logits, TOPIC_TEMPERATURE_BEFORE
            after = float(spec.options["temperature"])
            served = spec.options.get("label_bias") or {}
            bias = [float(served.get(n, 0.0)) for n in names] if served else None
            scaling = f"T {before:g} -> {after:.4g}" + (" + label bias" if bias else "")
        else:
            # before: the content-free prior divided out; after: as served now
            before_logits, _ = adapter_log_scores(
                spec, models_dir, texts, options={"label_bias": {}, "temperature": 1.0}
            )
            logits, _ = adapter_log_scores(spec, models_dir, texts)
            before = after = 1.0
            scaling = "content-free prior -> " + (
                "fitted T + label bias" if spec.options.get("label_bias") else "the same"
            )
    s = calibration_scores(before_logits, gold, before)
    t = calibration_scores(logits, gold, after, bias)
    rows: list[dict[str, Any]] = []
    for r, r0, g in zip(logits, before_logits, gold, strict=True):
        p, p0 = scaled_probs(r, after, bias), scaled_probs(r0, before)
        best, best0 = max(range(len(p)), key=p.__getitem__), max(range(len(p0)), key=p0.__getitem__)
        rows.append(
            {
                "gold": names[g],
                "predicted": names[best],
                "confidence": p[best],
                "correct": best == g,
                "confidence_before": p0[best0],
                "correct_before": best0 == g,
            }
        )
    return {
        "task": task,
        "set": file.name,
        "n": s["n"],
        "accuracy_before": s["accuracy_after"],
        "accuracy": t["accuracy_after"],
        "ece_before": s["ece_after"],
        "ece_after": t["ece_after"],
        "scaling": scaling,
        "ece_floor": ece_floor([x["confidence"] for x in rows]),
        "rows": rows,
    }


def ece_floor(confidences: list[float], draws: int = 400, seed: int = 0) -> float:
    """The mean ECE (10 bins) of a perfectly calibrated model with these confidences: each
    item right with probability equal to its confidence, `draws` times. What a set of
    this size and spread measures even when nothing is wrong (binning and sampling noise)."""
    import random

    from fleet.reporting.scoring import expected_calibration_error

    rng = random.Random(seed)
    total = 0.0
    for _ in range(draws):
        right = [rng.random() < c for c in confidences]
        total += expected_calibration_error(confidences, right)
    return round(total / draws, 6)


def pooled(task: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row over every set scored for `task`: the same items, binned together."""
    from fleet.reporting.scoring import expected_calibration_error

    rows = [x for r in results if r["task"] == task for x in r["rows"]]
    n = len(rows)
    conf = [x["confidence"] for x in rows]
    return {
        "task": task,
        "set": "all sets pooled",
        "n": n,
        "accuracy_before": sum(x["correct_before"] for x in rows) / n,
        "accuracy": sum(x["correct"] for x in rows) / n,
        "ece_before": expected_calibration_error(
            [x["confidence_before"] for x in rows], [x["correct_before"] for x in rows]
        ),
        "ece_after": expected_calibration_error(conf, [x["correct"] for x in rows]),
        "scaling": next(r["scaling"] for r in results if r["task"] == task),
        "ece_floor": ece_floor(conf),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sets", default=",".join(SETS), help="first,personas,grid[,outside]")
    ap.add_argument("--json", action="store_true", help="one JSON line per task and set")
    args = ap.parse_args(argv)
    from config.settings import Settings

    models_dir = args.models_dir or Settings().resolved_models_dir
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results = []
    for task in args.tasks.split(","):
        data = "intent" if task in ("topic", "llm_classify") else task
        evaluation = []  # the evaluation sets' rows: what the pooled row pools
        for name in args.sets.split(","):
            file = data_path(OUTSIDE[data]) if name == "outside" else EVAL / SETS[name].format(data)
            print(f"scoring {task} on {file.name} ...", file=sys.stderr, flush=True)
            r = score_task(task, file, models_dir)
            results.append(r)
            if name != "outside":
                evaluation.append(r)
            if args.json:
                print(json.dumps({k: v for k, v in r.items() if k != "rows"}), flush=True)
        if len(evaluation) > 1:
            results.append(pooled(task, evaluation))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print(
            "| task | set | n | accuracy before | accuracy after | ECE before | ECE after "
            "| ECE floor | scaling |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(
                f"| {r['task']} | {r['set']} | {r['n']} | {r['accuracy_before']:.3f} | "
                f"{r['accuracy']:.3f} | {r['ece_before']:.3f} | {r['ece_after']:.3f} | "
                f"{r['ece_floor']:.3f} | {r['scaling']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
