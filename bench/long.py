"""Long conversations: reading the head (the old way) vs reading every window.

    .venv/bin/python -m bench.long [--models-dir DIR] [--tasks intent,topic] [--llm-items 14]
        [--threads N] [--seed 0]

Sets (none of them is training data):
  long    bench.long_set: 210 conversations of 750-920 MiniLM tokens, each
          decisive request of bench.long_turns in five positions; 140 items of
          decisive requests 0-3 ("choice": the pooling rule is chosen on them) and
          70 of requests 4-5 ("held-out": never used for a choice)
  short   config/data/eval/intent_eval.jsonl (104 short conversations)
  alone   the 42 decisive requests alone

For `worthiness` (sequence_classify, worthiness-minilm) the long set's items are all
`worthy` (each holds a request) and 42 long conversations of small talk only
(bench.long_set.build_small_talk_set, half held out) are `not_worthy`; its short set
is config/data/eval/worthiness_eval.jsonl.

For `intent` (sequence_classify, intent-minilm) and `topic` (zero_shot embedding,
all-minilm-l6-v2 with the task's prototypes), at the tier's max_length (256):
  head      the joined text cut at max_length (how the fleet read before windows)
  windows   every window (workers.adapters.windowed, window_by = "tokens":
            whole turns packed into windows of max_length), pooled by each rule
            of workers.windows (the window probabilities are computed once, each
            rule pools the same rows)
  turns     one window per user turn (window_by = "user_turns", the tier's
            turn_context, max_windows 64 so that every user turn of the set is
            read), pooled by each rule
For `llm_classify` (SmolLM2 label scoring as configured), --llm-items items of
each part of the long set and of the short set (spread over labels and
positions), with the
prompt as the whole transcript (middle cut when it must: `prompt = "transcript"`,
the default), fitted around the user's turns (`prompt = "user_turns"`), and
scored one user turn per prompt past 256 tokens (tier option `window_by =
"user_turns"`), pooled by `margin` and by `latest` over chitchat, and
`selected-margin`: the intent encoder reads every user turn and picks one by
`margin` (tier option `turn_selector`), the LLM scores that turn alone
(`--llm-readings` runs a subset).

Prints, per task, reading and set: items, accuracy, macro-F1 (over the gold labels
of that set), CPU seconds per item and per 1,000 tokens read (process CPU time,
all threads, of prepare + forward pass; sub-batches of 16 items); then the share of
short items whose label is identical under head and windows, and the pooling rule
chosen on the choice part of `long`, and each reading's right answers per position
on that part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.classify_quality import EVAL_FILE, metrics
from bench.long_set import alone_set, build_long_set, build_small_talk_set
from config.data import data_path
from workers.windows import POOLING_RULES, build_windows, pool

BATCH = 16
WORTHINESS_EVAL = data_path("eval/worthiness_eval.jsonl")
BACKGROUND_LABELS = (
    "chitchat",
    "not_worthy",
)  # small talk (intent), nothing to act on (worthiness)
LLM_WINDOW_OPTIONS = (
    "window_by",
    "pooling",
    "background_labels",
    "window_tokens",
    "max_windows",
    "turn_selector",
)
TURN_MAX_WINDOWS = 64  # read by user turn: a window per user turn (the long set has 23-26)


def f1_over_gold(gold: list[str], pred: list[str | None]) -> dict[str, Any]:
    return metrics(gold, pred, sorted(set(gold)))


def encoder_readings(adapter: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Labels of every reading (head, and windows pooled by each rule) and their cost."""
    from workers.adapters.text import conversation_text
    from workers.adapters.windowed import Windows, encode_windows

    names = list(adapter.model.config.id2label.values()) if hasattr(adapter, "top_k") else None
    names = names or adapter.names
    out: dict[str, Any] = {"labels": {}, "cpu": {}, "tokens": {}}
    # The `salient` rule looks past small talk: the label set's background labels.
    background = [i for i, n in enumerate(names) if n in BACKGROUND_LABELS]
    one = build_windows([("user", 1)], size=1)
    readings = {
        "windows": replace(adapter.reading, window_by="tokens"),
        "turns": replace(adapter.reading, window_by="user_turns", max_windows=TURN_MAX_WINDOWS),
    }
    for reading in ("head", "windows", "turns"):
        cpu = 0.0
        tokens = 0
        preds: dict[str, list[str]] = {}
        for k in range(0, len(rows), BATCH):
            chunk = rows[k : k + BATCH]
            started = time.process_time()
            if reading == "head":
                payloads = [
                    Windows(
                        [
                            adapter.tokenizer(
                                conversation_text({"messages": r["messages"]}, max_chars=10**6),
                                truncation=True,
                                max_length=adapter.max_length,
                            )["input_ids"]
                        ],
                        one,
                    )
                    for r in chunk
                ]
            else:
                payloads = [
                    encode_windows(
                        adapter.tokenizer,
                        {"messages": r["messages"]},
                        readings[reading],
                        max_chars=10**6,
                    )
                    for r in chunk
                ]
            probs = adapter.window_probs(payloads)
            cpu += time.process_time() - started
            tokens += sum(len(ids) for w in payloads for ids in w.ids)
            at = 0
            for w in payloads:
                rows_w = probs[at : at + len(w.ids)]
                at += len(w.ids)
                rules = ("head",) if reading == "head" else POOLING_RULES
                for rule in rules:
                    p = pool(
                        rows_w, w.plan, "mean" if rule == "head" else rule, background=background
                    )
                    best = max(range(len(names)), key=p.probs.__getitem__)
                    preds.setdefault(rule, []).append(str(names[best]))
        for rule, labels in preds.items():
            key = "head" if rule == "head" else f"{reading}-{rule}"
            out["labels"][key] = labels
            out["cpu"][key] = cpu
            out["tokens"][key] = tokens
    return out


def load_encoders(models_dir: Path, names: list[str]) -> dict[str, Any]:
    from config.taskconfig import load_tasks
    from fleet.models.catalogue import INTENT, WORTHINESS
    from fleet.models.prepare import prepare_bundled, prepare_minilm
    from workers.adapters.sequence_classify import SequenceClassifyAdapter
    from workers.adapters.zero_shot import ZeroShotAdapter

    tasks = load_tasks()
    out: dict[str, Any] = {}
    for task, folder in (("intent", INTENT), ("worthiness", WORTHINESS)):
        if task not in names:
            continue
        if not (models_dir / folder / "config.json").is_file():  # measure the folder as it is
            prepare_bundled(models_dir, folder)
        out[task] = SequenceClassifyAdapter()
        out[task].load(tasks[task].ladder[0], str(models_dir / folder), "cpu")
    if "topic" in names:
        prepare_minilm(models_dir)
        out["topic"] = ZeroShotAdapter(labels=tasks["topic"].labels, **tasks["topic"].options)
        tier = tasks["topic"].ladder[0]
        out["topic"].load(tier, str(models_dir / tier.path), "cpu")
    return out


def llm_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` rows spread over labels and positions (round robin over labels)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for i, group in enumerate(by_label.values()):  # rotate positions between labels
        group[:] = group[i % len(group) :] + group[: i % len(group)]
    out: list[dict[str, Any]] = []
    while len(out) < n and any(by_label.values()):
        for group in by_label.values():
            if group and len(out) < n:
                out.append(group.pop(0))
    return out


def run_llm(
    models_dir: Path, sets: dict[str, list[dict[str, Any]]], only: set[str] | None = None
) -> dict[tuple[str, str], Any]:
    from config.taskconfig import load_tasks, with_model_folders
    from fleet.models.catalogue import INTENT
    from fleet.models.convert.smollm import prepare_smollm
    from fleet.models.prepare import prepare_bundled
    from workers.adapters.base import InputError, Source
    from workers.adapters.llm_classify import LLMClassifyAdapter
    from workers.adapters.turn_selector import TurnSelector

    spec = load_tasks()["llm_classify"]
    folder = prepare_smollm(models_dir)
    if not (models_dir / INTENT / "config.json").is_file():  # the turn selector
        prepare_bundled(models_dir, INTENT)
    adapter = LLMClassifyAdapter(labels=spec.labels, **spec.options)
    tier = with_model_folders(spec.ladder[0], models_dir)
    adapter.load(tier, str(folder), "cpu")
    whole = {k: v for k, v in tier.options.items() if k not in LLM_WINDOW_OPTIONS}
    readings: dict[str, tuple[str, dict[str, Any]]] = {
        "transcript": ("transcript", whole),
        "user_turns": ("user_turns", whole),
    }
    for rule in ("margin", "latest"):
        readings[f"turns-{rule}"] = (
            "transcript",
            {
                **whole,
                "window_by": "user_turns",
                "pooling": rule,
                "background_labels": ["chitchat"],
            },
        )
    # The turn the intent encoder picks (by user turn, `margin`), scored by the LLM alone.
    readings["selected-margin"] = (
        "transcript",
        {
            **whole,
            "window_by": "user_turns",
            "pooling": "margin",
            "background_labels": ["chitchat"],
            "turn_selector": str(models_dir / INTENT),
        },
    )
    if only:
        unknown = sorted(only - set(readings))
        if unknown:
            raise SystemExit(f"--llm-readings: unknown {unknown}; known: {', '.join(readings)}")
        readings = {k: v for k, v in readings.items() if k in only}
    out: dict[tuple[str, str], Any] = {}
    for prompt, name in [(p, n) for p in readings for n in sets]:
        adapter.prompt = readings[prompt][0]
        read_tier = replace(tier, options=readings[prompt][1])
        adapter.reading, adapter.background = adapter.turn_reading(read_tier)
        if adapter.selector is not None:
            adapter.selector.unload()
        adapter.selector = TurnSelector.from_tier(read_tier, adapter.reading, "cpu")
        rows = sets[name]
        preds: list[str | None] = []
        tokens = 0
        started = time.process_time()
        for k in range(0, len(rows), 8):
            prepared = [
                adapter.prepare(
                    Source(i, "conversation", r["external_id"], {"messages": r["messages"]})
                )
                for i, r in enumerate(rows[k : k + 8])
            ]
            tokens += sum(p.cost for p in prepared)
            preds += [
                None if isinstance(p, InputError) else p.label for p in adapter.predict(prepared)
            ]
        out[prompt, name] = (preds, time.process_time() - started, tokens)
    adapter.unload()
    return out


def line(
    task: str,
    reading: str,
    set_name: str,
    gold: list[str],
    pred: list[Any],
    cpu: float,
    tokens: int,
) -> str:
    m = f1_over_gold(gold, pred)
    n = len(gold)
    return (
        f"| {task} | {reading} | {set_name} | {n} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
        f"{cpu / n:.3f} | {tokens / n:.0f} | {1000 * cpu / max(tokens, 1):.3f} |"
    )


def task_sets(
    task: str, long_rows: list[dict[str, Any]], short_rows: list[dict[str, Any]], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """The sets a task is scored on. Intent and topic: the long set, the short intent
    set, the requests alone. Worthiness: every long item is `worthy` (each holds a
    request), joined by as many-ish long conversations of small talk only
    (`not_worthy`, bench.long_set.build_small_talk_set); short: the worthiness
    evaluation set; the requests alone, `worthy`."""
    alone = alone_set()
    if task == "worthiness":
        talk = build_small_talk_set(seed)
        long_rows = [{**r, "label": "worthy"} for r in long_rows] + talk
        short_rows = [json.loads(x) for x in WORTHINESS_EVAL.read_text().splitlines() if x.strip()]
        alone = [{**r, "label": "worthy"} for r in alone]
    return {
        "long": long_rows,
        "long choice": [r for r in long_rows if not r["held_out"]],
        "long held-out": [r for r in long_rows if r["held_out"]],
        "short": short_rows,
        "alone": alone,
    }


def print_positions(task: str, rows: list[dict[str, Any]], labels: dict[str, list[str]]) -> None:
    """Each reading's right answers per position on the long set's choice part."""
    positions = sorted({r["position"] for r in rows})
    print(f"{task}, long choice part, right per position ({', '.join(positions)}):")
    for reading, got in labels.items():
        right = {p: [0, 0] for p in positions}
        for r, label in zip(rows, got, strict=True):
            if not r["held_out"]:
                right[r["position"]][0] += label == r["label"]
                right[r["position"]][1] += 1
        print(f"  {reading}: " + ", ".join(f"{p} {a}/{n}" for p, (a, n) in right.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default=os.environ.get("FLEET_MODELS_DIR"))
    parser.add_argument(
        "--llm-items", type=int, default=14, help="long and short items for the LLM (0: skip)"
    )
    parser.add_argument(
        "--llm-readings",
        default="",
        help="comma-separated LLM readings to run (default: all; e.g. turns-latest,selected-margin)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="intent,topic", help="encoder tasks to measure")
    parser.add_argument(
        "--json", action="store_true", help="one JSON line with every figure at the end"
    )
    args = parser.parse_args(argv)
    if not args.models_dir:
        parser.error("--models-dir (or FLEET_MODELS_DIR) is needed: where models are prepared")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models_dir = Path(args.models_dir)
    long_rows = build_long_set(args.seed)
    short_rows = [json.loads(x) for x in EVAL_FILE.read_text().splitlines() if x.strip()]
    sets = {
        "long": long_rows,
        "long choice": [r for r in long_rows if not r["held_out"]],
        "long held-out": [r for r in long_rows if r["held_out"]],
        "short": short_rows,
        "alone": alone_set(),
    }
    print(
        f"{len(long_rows)} long, {len(short_rows)} short, {len(sets['alone'])} alone; torch threads {torch.get_num_threads()}"
    )
    print(
        "| task | reading | set | items | accuracy | macro-F1 | CPU s/item | tokens/item | CPU s/1k tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    figures: dict[str, Any] = {}
    choice_f1: dict[str, float] = {}
    for task, adapter in load_encoders(models_dir, args.tasks.split(",")).items():
        sets = task_sets(task, long_rows, short_rows, args.seed)
        runs = {s: encoder_readings(adapter, sets[s]) for s in ("long", "short", "alone")}
        for reading in runs["long"]["labels"]:
            for s in ("long", "long choice", "long held-out", "short", "alone"):
                base = "long" if s.startswith("long") else s
                rows = sets[s]
                ids = {r["external_id"] for r in rows}
                keep = [i for i, r in enumerate(sets[base]) if r["external_id"] in ids]
                pred = [runs[base]["labels"][reading][i] for i in keep]
                gold = [sets[base][i]["label"] for i in keep]
                share = len(keep) / len(sets[base])
                cpu, tokens = (
                    runs[base]["cpu"][reading] * share,
                    int(runs[base]["tokens"][reading] * share),
                )
                print(line(task, reading, s, gold, pred, cpu, tokens), flush=True)
                figures[f"{task}/{reading}/{s}"] = f1_over_gold(gold, pred)["macro_f1"]
                if s == "long choice" and reading != "head":
                    choice_f1[reading] = (
                        choice_f1.get(reading, 0.0) + figures[f"{task}/{reading}/{s}"]
                    )
        print_positions(task, sets["long"], runs["long"]["labels"])
        short = runs["short"]["labels"]
        for reading in short:
            same = sum(a == b for a, b in zip(short["head"], short[reading], strict=True))
            print(
                f"{task} short items labelled as head-reading by {reading}: {same}/{len(short['head'])}"
            )
        adapter.unload()
    if choice_f1:
        best = max(choice_f1, key=choice_f1.__getitem__)
        print(f"pooling chosen on the long choice part ({args.tasks} macro-F1 summed): {best}")
    if args.llm_items:
        picked = {
            "long choice": llm_rows([r for r in long_rows if not r["held_out"]], args.llm_items),
            "long held-out": llm_rows([r for r in long_rows if r["held_out"]], args.llm_items),
            "short": llm_rows(short_rows, args.llm_items),
        }
        for (prompt, s), (pred, cpu, tokens) in run_llm(
            models_dir, picked, set(filter(None, args.llm_readings.split(",")))
        ).items():
            gold = [r["label"] for r in picked[s]]
            print(line("llm_classify", prompt, s, gold, pred, cpu, tokens), flush=True)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
