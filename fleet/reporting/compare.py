"""`fleet compare`: a shadow run of two models over the same items.

Both models run in this process through the task's real adapter and runtime,
one after the other (so only one is in memory at a time); their answers are
kept side by side in a JSONL file and summarised as a disagreement rate.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from config.settings import Settings
from config.taskconfig import TaskSpec, TierSpec
from db.engine import transaction
from db.sources import first_source_ids, load_inputs
from workers.adapters import make_adapter
from workers.adapters.base import Source
from workers.runtime import ItemResult, ModelRuntime

CHUNK = 64


def _sources(url: str, spec: TaskSpec, limit: int) -> list[Source]:
    with transaction(url) as session:
        ids = first_source_ids(session, kind=spec.source, limit=limit)
        inputs = load_inputs(
            session, [(i, spec.source, i) for i in ids], text_from_task=spec.input_from
        )
    return [Source(i, spec.source, ext, data) for i, (ext, data) in inputs.items()]


def _run_model(
    settings: Settings, spec: TaskSpec, model: str, sources: list[Source]
) -> dict[int, ItemResult]:
    from workers.device import pick_device

    base = spec.ladder[0]
    tier = TierSpec(
        name=Path(model).name,
        path=model,
        dtype=base.dtype,
        max_length=base.max_length,
        max_batch_tokens=base.max_batch_tokens,
        options=base.options,
    )
    one = replace(spec, ladder=(tier,))
    runtime = ModelRuntime(
        one,
        make_adapter(
            one, max_chars=settings.max_text_chars, audio_root=settings.resolved_audio_root
        ),
        models_dir=settings.resolved_models_dir,
        device=pick_device(),
    )
    runtime.start()
    try:
        out: dict[int, ItemResult] = {}
        for i in range(0, len(sources), CHUNK):
            results, _ = runtime.run(sources[i : i + CHUNK])
            out.update({r.item_id: r for r in results})
        return out
    finally:
        runtime.stop()


def compare(
    settings: Settings,
    spec: TaskSpec,
    model_a: str,
    model_b: str,
    *,
    limit: int,
    out_path: Path,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run both models on the first `limit` items of the task's source, in this
    process, and write the answers side by side to `out_path` (JSONL).

    Returns {n, disagreement_rate, top_disagreements, examples, file, seconds:
    {"a", "b"} (each model's load and run, wall seconds), device}. `echo` gets a
    line as each model starts and ends (long on a CPU: minutes for hundreds of
    items)."""
    import time

    from workers.device import pick_device

    say = echo or (lambda line: None)
    url = settings.db_url()
    sources = _sources(url, spec, limit)
    device = pick_device()
    seconds: dict[str, float] = {}
    answers: dict[str, dict[int, ItemResult]] = {}
    for key, model in (("a", model_a), ("b", model_b)):
        say(f"model {key.upper()} ({model}): loading and running {len(sources)} items on {device}")
        started = time.monotonic()
        answers[key] = _run_model(settings, spec, model, sources)
        seconds[key] = round(time.monotonic() - started, 2)
        say(f"model {key.upper()}: {len(sources)} items in {seconds[key]:.1f}s")
    a, b = answers["a"], answers["b"]
    pairs: Counter[tuple[str | None, str | None]] = Counter()
    examples: list[dict[str, Any]] = []
    disagree = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for src in sources:
            ra, rb = a[src.item_id], b[src.item_id]
            la = ra.prediction.label if ra.prediction else None
            lb = rb.prediction.label if rb.prediction else None
            agree = la == lb and ra.error is None and rb.error is None
            disagree += not agree
            pairs[(la, lb)] += 1
            row = {
                "external_id": src.external_id,
                "agree": agree,
                "a": {
                    "model": model_a,
                    "label": la,
                    "confidence": ra.prediction.confidence if ra.prediction else None,
                    "error": ra.error,
                },
                "b": {
                    "model": model_b,
                    "label": lb,
                    "confidence": rb.prediction.confidence if rb.prediction else None,
                    "error": rb.error,
                },
            }
            f.write(json.dumps(row) + "\n")
            if not agree and len(examples) < 10:
                examples.append(row)
    n = len(sources)
    return {
        "n": n,
        "disagreement_rate": disagree / n if n else 0.0,
        "top_disagreements": [
            {"a": la, "b": lb, "count": c} for (la, lb), c in pairs.most_common() if la != lb
        ][:10],
        "examples": examples,
        "file": str(out_path),
        "seconds": seconds,
        "device": device,
    }


# fleet.review.promote scores a candidate and the serving model the same way.
run_model = _run_model
