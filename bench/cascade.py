"""A cascade against its two tiers alone: accuracy, cost and the errors escalation catches.

    .venv/bin/python -m bench.cascade [--models-dir DIR] [--target 0.2]
        [--cheap-cost 0.0002] [--strong-cost 0.01] [--strong oracle|TASK]

Cheap tier: the bundled intent classifier (`intent-minilm`, its calibration.json
applied), run through the `sequence_classify` adapter in this process. Strong
tier: by default an oracle of known accuracy (the `fake` kind reading the gold
labels, accuracy 1.0), else a task of the task config run through its adapter
(e.g. `--strong llm_classify`; on a GPU machine, a real instruct LLM's tier).
Costs are per item, in whatever unit --cheap-cost and --strong-cost are given.

Sets: the intent evaluation sets of config/data/eval/ (README there). The
threshold is the one `fleet calibrate --target-escalation` picks
(`workers.cascade.threshold_for_share`): a quantile of the cheap tier's
confidences, which needs no labels. It is picked twice: on the set itself (as
`fleet calibrate` does on the traffic it will route), and on the other set and
carried over (how well a threshold travels). Labels only score the outcome.

Per set, side by side: cheap only, strong only and the cascade (accuracy, cost
per item, share escalated), and the share of the cheap tier's errors that were
among the escalated items (errors caught per escalation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "config" / "data" / "eval"
SETS = ("intent_eval.jsonl", "intent_personas.jsonl")


def _answers(adapter: Any, rows: list[dict[str, Any]], kind: str) -> list[tuple[str, float]]:
    from workers.adapters.base import InputError, Source

    prepared = [
        adapter.prepare(Source(i, kind, str(r["external_id"]), {"messages": r["messages"]}))
        for i, r in enumerate(rows)
    ]
    out: list[tuple[str, float]] = []
    for k in range(0, len(prepared), 16):
        for pred in adapter.predict(prepared[k : k + 16]):
            if isinstance(pred, InputError) or pred.label is None:
                raise RuntimeError(f"an item failed: {pred}")
            out.append((pred.label, float(pred.confidence or 0.0)))
    return out


def tier_answers(
    task: str, rows: list[dict[str, Any]], models_dir: Path, gold_file: Path | None = None
) -> list[tuple[str, float]]:
    """(label, confidence) per row from `task`'s adapter (first ladder tier that exists),
    or from the oracle (`fake` with `gold_file`) when task is "oracle"."""
    from config.taskconfig import TierSpec, load_tasks, resolve_model_path
    from workers.adapters import make_adapter

    if task == "oracle":
        from workers.adapters.fake import FakeAdapter

        oracle = FakeAdapter(gold=str(gold_file))
        oracle.load(TierSpec(name="oracle", path="oracle"), "oracle", "cpu")
        return _answers(oracle, rows, "conversation")
    spec = load_tasks(None)[task]
    tier = next(t for t in spec.ladder if resolve_model_path(t, models_dir).exists())
    adapter = make_adapter(spec, max_chars=1_000_000, audio_root=models_dir)
    adapter.load(tier, str(resolve_model_path(tier, models_dir)), "cpu")
    try:
        return _answers(adapter, rows, spec.source)
    finally:
        adapter.unload()


def cascade_row(
    gold: list[str],
    cheap: list[tuple[str, float]],
    strong: list[tuple[str, float]],
    threshold: float,
    cheap_cost: float,
    strong_cost: float,
) -> dict[str, Any]:
    """The cascade's outcome at `threshold`, decided by `workers.cascade.should_escalate`."""
    from config.taskconfig import TaskSpec, TierSpec
    from workers.cascade import should_escalate

    spec = TaskSpec(
        name="intent",
        kind="sequence_classify",
        source="conversation",
        ladder=(TierSpec(name="m", path="m"),),
        escalate_to="strong",
        escalate_below=threshold,
    )
    n = len(gold)
    sent = [should_escalate(spec, lab, conf) for lab, conf in cheap]
    final = [s[0] if e else c[0] for c, s, e in zip(cheap, strong, sent, strict=True)]
    errors = [c[0] != g for c, g in zip(cheap, gold, strict=True)]
    caught = sum(1 for e, err in zip(sent, errors, strict=True) if e and err)
    return {
        "threshold": round(threshold, 4),
        "escalated_share": sum(sent) / n,
        "accuracy": sum(f == g for f, g in zip(final, gold, strict=True)) / n,
        "cost_per_item": cheap_cost + strong_cost * sum(sent) / n,
        "cheap_errors": sum(errors),
        "errors_caught": caught,
        "errors_caught_share": caught / sum(errors) if any(errors) else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--target", type=float, default=0.2, help="share to escalate (0-1)")
    ap.add_argument("--cheap-cost", type=float, default=0.0002)
    ap.add_argument("--strong-cost", type=float, default=0.01)
    ap.add_argument("--strong", default="oracle", help="oracle, or a task of the task config")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from config.settings import Settings
    from workers.cascade import threshold_for_share

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    models_dir = args.models_dir or Settings().resolved_models_dir
    data: dict[str, dict[str, Any]] = {}
    for name in SETS:
        rows = [json.loads(x) for x in (EVAL / name).read_text().splitlines() if x.strip()]
        gold_file = EVAL / name
        print(f"running both tiers on {name} ...", file=sys.stderr, flush=True)
        data[name] = {
            "gold": [r["label"] for r in rows],
            "cheap": tier_answers("intent", rows, models_dir),
            "strong": tier_answers(args.strong, rows, models_dir, gold_file),
        }
    results = []
    for name, d in data.items():
        other = next(s for s in SETS if s != name)
        n, gold = len(d["gold"]), d["gold"]
        acc = {
            t: sum(a[0] == g for a, g in zip(d[t], gold, strict=True)) / n
            for t in ("cheap", "strong")
        }
        for picked_on in (name, other):
            t = threshold_for_share([c for _, c in data[picked_on]["cheap"]], args.target)
            row = cascade_row(gold, d["cheap"], d["strong"], t, args.cheap_cost, args.strong_cost)
            results.append(
                {
                    "set": name,
                    "n": n,
                    "threshold_picked_on": picked_on,
                    "cheap_accuracy": acc["cheap"],
                    "cheap_cost": args.cheap_cost,
                    "strong_accuracy": acc["strong"],
                    "strong_cost": args.strong_cost,
                    **row,
                }
            )
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    print(
        f"strong tier: {args.strong}; costs per item: cheap {args.cheap_cost:g}, strong "
        f"{args.strong_cost:g}; target escalation {args.target:.0%}"
    )
    print(
        "| set (n) | threshold picked on | cheap only acc / cost | strong only acc / cost | "
        "cascade acc / cost | escalated | cheap errors caught |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        caught = (
            f"{r['errors_caught']} of {r['cheap_errors']} ({r['errors_caught_share']:.0%})"
            if r["cheap_errors"]
            else "no errors"
        )
        print(
            f"| {r['set']} ({r['n']}) | {r['threshold_picked_on']} (< {r['threshold']}) | "
            f"{r['cheap_accuracy']:.3f} / {r['cheap_cost']:g} | "
            f"{r['strong_accuracy']:.3f} / {r['strong_cost']:g} | "
            f"{r['accuracy']:.3f} / {r['cost_per_item']:.5f} | "
            f"{r['escalated_share']:.1%} | {caught} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
