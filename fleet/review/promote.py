"""`fleet promote` and `fleet rollback`: a model change that is gated and reversible.

    candidate, current (the ladder's top tier) ── both run in this process over:
      the confirmed labels (+ --gold files)   -> macro-F1 each, candidate ECE
      a label-stratified sample of stored items -> candidate vs stored label shares
    gates (fleet.review.gates.decide)
      any fails  -> nothing is written; the report names the gate
      all pass   -> one transaction (db.ladders.promote): the new ladder recorded,
                    current results copied to result_history, items pending again
                    with their old results still served until the new ones land
    fleet rollback -> db.ladders.rollback: the copies restored in one transaction

Workers read the ladder when they start: restart the task's workers (or let
`fleet run`/`fleet nightly --local-workers` start them) after either command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from config.settings import Settings
from config.taskconfig import TaskSpec, TierSpec, tier_table
from db import ladders
from db import review as rq
from db.engine import transaction
from db.sources import load_inputs
from fleet.reporting.compare import run_model
from fleet.reporting.export import GoldLabels, load_gold
from fleet.reporting.scoring import classification_report
from fleet.review.gates import Gate, GateLimits, decide, expected_calibration_error, share_shift
from fleet.review.gold import confirmed_gold
from workers.adapters.base import Source

SAMPLE_SQL = """
    SELECT item_id, source_kind, source_id, label FROM (
        SELECT w.id AS item_id, w.source_kind, w.source_id, r.label,
               row_number() OVER (PARTITION BY r.label ORDER BY md5(w.id::text)) AS rn
        FROM work_items w JOIN results r ON r.work_item_id = w.id
        WHERE w.task = :task AND w.status = 'done'
    ) s WHERE rn <= :k ORDER BY item_id
"""


@dataclass
class PromotionCheck:
    """The figures and verdicts of one candidate."""

    task: str
    candidate: str
    current: str
    n_gold: int = 0
    current_f1: float = 0.0
    candidate_f1: float = 0.0
    ece: float = 0.0
    n_sample: int = 0
    shifts: dict[str, float] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for --json and the ladder_overrides row."""
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _gold(url: str, task: str, files: list[Path]) -> GoldLabels:
    gold = confirmed_gold(url, task=task)
    for f in files:
        more = load_gold(f)
        gold.per_source.update(more.per_source)
        gold.any_source.update(more.any_source)
    return gold


def _gold_sources(url: str, spec: TaskSpec, gold: GoldLabels) -> tuple[list[Source], list[str]]:
    keys: list[tuple[str | None, str]] = [(s, e) for s, e in gold.per_source]
    keys += [(None, e) for e in gold.any_source]
    with transaction(url) as session:
        found = rq.resolve_items(session, task=spec.name, keys=keys)
        chosen = []
        for key in keys:
            refs = found.get(key, [])
            if len(refs) == 1:
                label = (
                    gold.per_source[(str(key[0]), key[1])]
                    if key[0] is not None
                    else gold.any_source[key[1]]
                )
                chosen.append((refs[0], label))
        inputs = load_inputs(
            session,
            [(r.item_id, r.source_kind, r.source_id) for r, _ in chosen],
            text_from_task=spec.input_from,
        )
    sources, truth = [], []
    for ref, label in chosen:
        if ref.item_id in inputs:
            ext, data = inputs[ref.item_id]
            sources.append(Source(ref.item_id, ref.source_kind, ext, data))
            truth.append(label)
    return sources, truth


def _sample(url: str, spec: TaskSpec, per_label: int) -> tuple[list[Source], list[str | None]]:
    with transaction(url) as session:
        rows = session.execute(text(SAMPLE_SQL), {"task": spec.name, "k": per_label}).all()
        inputs = load_inputs(
            session, [(r[0], r[1], r[2]) for r in rows], text_from_task=spec.input_from
        )
    sources = [Source(r[0], r[1], inputs[r[0]][0], inputs[r[0]][1]) for r in rows if r[0] in inputs]
    stored = [r[3] for r in rows if r[0] in inputs]
    return sources, stored


def _label(r: Any) -> str | None:
    return r.prediction.label if r.prediction is not None else None


def _confidence(r: Any) -> float:
    return float(r.prediction.confidence or 0.0) if r.prediction is not None else 0.0


def check_candidate(
    settings: Settings,
    spec: TaskSpec,
    candidate: str,
    *,
    gold_files: list[Path],
    limits: GateLimits,
    sample_per_label: int = 50,
) -> PromotionCheck:
    """Score the candidate against the serving model and apply the gates (writes nothing)."""
    url = settings.db_url()
    current = spec.ladder[0].path
    check = PromotionCheck(spec.name, candidate, current)
    sources, truth = _gold_sources(url, spec, _gold(url, spec.name, gold_files))
    check.n_gold = len(sources)
    if sources:
        names = sorted(set(truth))
        cur = run_model(settings, spec, current, sources)
        cand = run_model(settings, spec, candidate, sources)

        check.current_f1 = classification_report(
            truth, [_label(cur[s.item_id]) for s in sources], names
        )["macro_f1"]
        cand_labels = [_label(cand[s.item_id]) for s in sources]
        check.candidate_f1 = classification_report(truth, cand_labels, names)["macro_f1"]
        confs = [_confidence(cand[s.item_id]) for s in sources]
        check.ece = expected_calibration_error(
            confs, [p == t for p, t in zip(cand_labels, truth, strict=True)]
        )
    sample, stored = _sample(url, spec, sample_per_label)
    check.n_sample = len(sample)
    if sample:
        shadow = run_model(settings, spec, candidate, sample)
        new = [_label(shadow[s.item_id]) for s in sample]
        check.shifts = share_shift(stored, new)
    check.gates = decide(
        current_f1=check.current_f1,
        candidate_f1=check.candidate_f1,
        n_gold=check.n_gold,
        shifts=check.shifts,
        ece=check.ece,
        limits=limits,
    )
    return check


def candidate_ladder(spec: TaskSpec, candidate: str) -> list[dict[str, Any]]:
    """The new ladder: the candidate on top with the current top tier's settings,
    the rest of the ladder below it unchanged."""
    base = spec.ladder[0]
    top = TierSpec(
        name=Path(candidate).name,
        path=candidate,
        dtype=base.dtype,
        max_length=base.max_length,
        max_batch_tokens=base.max_batch_tokens,
        min_batch_tokens=base.min_batch_tokens,
        options=base.options,
    )
    return [tier_table(top)] + [tier_table(t) for t in spec.ladder[1:]]


def apply(url: str, spec: TaskSpec, check: PromotionCheck) -> tuple[int, int]:
    """Record the promotion (only for a check that passed). Returns (override id, items back)."""
    if not check.passed:
        raise ValueError("a candidate that failed a gate is never promoted")
    with transaction(url) as session:
        return ladders.promote(
            session,
            task=spec.name,
            ladder=candidate_ladder(spec, check.candidate),
            gates=check.as_dict(),
        )
