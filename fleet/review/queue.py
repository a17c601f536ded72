"""`fleet review export`: pick what people should review, hold it, write Label Studio tasks.

    candidates (done, not confirmed, not held)  ── db.review.candidates
        │ strategy (fleet.review.strategies): uncertainty | margin | disagreement | diverse | random
        ▼
    hold (review_holds, until now + hold_hours; an item another export holds is not taken)
        ▼
    <out>.json   Label Studio tasks with the stored answer as a prediction (pre-annotation)
    <out>.jsonl  one line per item: source, external_id, task, label, confidence, text
    <out>.xml    the labeling config the tasks are made for

Candidates are read once into memory (ids, labels and scores: about 200 bytes
an item); `diverse` embeds only its pool (10 x budget texts).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.taskconfig import TaskSpec
from db import review as rq
from db.engine import transaction
from fleet.review import labelstudio as ls
from fleet.review import strategies as st
from fleet.review.texts import item_texts


@dataclass
class ExportReport:
    """What an export did: how many it considered and held, and where it wrote them."""

    export_id: str
    strategy: str
    candidates: int = 0
    picked: int = 0
    held: int = 0
    lost_to_other_export: int = 0
    files: dict[str, str] = field(default_factory=dict)


def _pick(
    strategy: str,
    cands: Sequence[st.Candidate],
    budget: int,
    *,
    seed: int,
    embed: Any,
) -> list[int]:
    if strategy == "uncertainty":
        return st.pick_uncertainty(cands, budget)
    if strategy == "margin":
        return st.pick_margin(cands, budget)
    if strategy == "disagreement":
        return st.pick_disagreement(cands, budget)
    if strategy == "diverse":
        return st.pick_diverse(cands, budget, embed=embed, seed=seed)
    if strategy == "random":
        return st.pick_random(cands, budget, seed=seed)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(st.STRATEGIES)}")


def export_queue(
    url: str,
    spec: TaskSpec,
    *,
    budget: int,
    strategy: str,
    out: Path,
    labels: Sequence[str],
    since: dt.datetime | None = None,
    source: str | None = None,
    against: str | None = None,
    hold_hours: float = 72.0,
    seed: int = 0,
    max_chars: int = 20000,
    models_dir: Path | None = None,
) -> ExportReport:
    """Pick up to `budget` of `spec`'s items by `strategy`, hold them, write the files.

    `out` is the Label Studio JSON path; the JSONL and XML go beside it.
    `against`: the other task for `disagreement` (required there). Raises
    ValueError for an unknown strategy or `disagreement` without `against`."""
    if strategy == "disagreement" and not against:
        raise ValueError("--strategy disagreement needs --against TASK (the other answer)")
    report = ExportReport(uuid.uuid4().hex[:12], strategy)
    meta: dict[int, dict[str, Any]] = {}
    with transaction(url) as session:
        for row in rq.candidates(session, task=spec.name, since=since, source=source):
            meta[row["item_id"]] = row
        others = (
            rq.labels_of_task(
                session,
                task=str(against),
                item_keys=[(m["source_kind"], m["source_id"]) for m in meta.values()],
            )
            if against
            else {}
        )
    cands = [
        st.Candidate(
            item_id=i,
            label=m["label"],
            scores={str(k): float(v) for k, v in (m["scores"] or {}).items()},
            confidence=m["confidence"],
            other_label=others.get((m["source_kind"], m["source_id"])),
        )
        for i, m in meta.items()
    ]
    report.candidates = len(cands)

    def embed(ids: Sequence[int]) -> Any:
        from fleet.review.embed import Embedder, minilm_folder

        texts = item_texts(
            url,
            spec,
            [(i, meta[i]["source_kind"], meta[i]["source_id"]) for i in ids],
            max_chars=max_chars,
        )
        return Embedder(minilm_folder(models_dir)).embed([texts[i] for i in ids])

    picked = _pick(strategy, cands, budget, seed=seed, embed=embed)
    report.picked = len(picked)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=hold_hours)
    with transaction(url) as session:
        held = rq.hold(
            session,
            task=spec.name,
            item_ids=picked,
            export_id=report.export_id,
            strategy=strategy,
            expires_at=expires,
        )
    held_set = set(held)
    order = [i for i in picked if i in held_set]
    report.held = len(order)
    report.lost_to_other_export = len(picked) - len(order)
    texts = item_texts(
        url,
        spec,
        [(i, meta[i]["source_kind"], meta[i]["source_id"]) for i in order],
        max_chars=max_chars,
    )
    tasks, lines = [], []
    for i in order:
        m = meta[i]
        extra: dict[str, Any] = {"fleet_strategy": strategy, "fleet_export": report.export_id}
        if against:
            extra["fleet_other_label"] = others.get((m["source_kind"], m["source_id"]))
        tasks.append(
            ls.to_task(
                text=texts[i],
                source=m["source"],
                external_id=m["external_id"],
                task=spec.name,
                label=m["label"],
                score=m["confidence"],
                model_version=f"fleet:{spec.name}",
                extra=extra,
            )
        )
        lines.append(
            {
                "source": m["source"],
                "external_id": m["external_id"],
                "task": spec.name,
                "label": m["label"],
                "confidence": m["confidence"],
                "scores": m["scores"],
                "text": texts[i],
                **extra,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    jsonl = out.with_suffix(".jsonl")
    with jsonl.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    xml = out.with_suffix(".xml")
    xml.write_text(ls.label_config(labels), encoding="utf-8")
    report.files = {"label_studio": str(out), "jsonl": str(jsonl), "label_config": str(xml)}
    return report
