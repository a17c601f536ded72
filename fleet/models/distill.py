"""Training sets from the fleet's own stored results (distillation).

The nightly `llm_classify` run leaves a label and a confidence per
conversation in `results`. Those labels, above a confidence floor, are a
training set for the fast encoder: `fleet train --task intent --from-task
llm_classify --min-confidence 0.8`. The text is built from the stored
conversation exactly as the serving adapter builds it, and the LLM's
confidence becomes the example's loss weight, so an uncertain label counts
for less than a sure one.

"Only what a person confirmed": `--confirmed FILE` takes the reviewed labels
in the `fleet eval --gold` format (`{"external_id", "label"}` lines, optionally
`"source"`) and keeps an item only when the reviewer gave it the label the LLM
gave it. external_id is unique per source only: a line that names no source
confirms nothing of an id two sources hold (counted as ambiguous), as
`fleet eval` leaves such ids unscored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import TextClause, text

from db.engine import get_engine
from fleet.models.labeled import MAX_TEXT_CHARS, Example
from fleet.reporting.export import GoldLabels
from workers.adapters.base import InputError
from workers.adapters.text import conversation_text

DISTILL_SQL = """
    SELECT c.external_id, COALESCE(c.source, 'ingest') AS source, c.messages, r.label,
           r.confidence, {shared} AS shared
    FROM results r
    JOIN work_items w ON w.id = r.work_item_id
    JOIN conversations c ON w.source_kind = 'conversation' AND c.id = w.source_id
    {shared_join}
    WHERE w.task = :task AND w.status = 'done' AND r.label IS NOT NULL
    ORDER BY w.id
    """
# Ids that more than one source's conversations hold among the task's items (any
# status, as `fleet eval` counts them); read only when reviewed lines name no source.
SHARED_JOIN = """
    LEFT JOIN (
        SELECT c2.external_id
        FROM work_items w2
        JOIN conversations c2 ON w2.source_kind = 'conversation' AND c2.id = w2.source_id
        WHERE w2.task = :task
        GROUP BY c2.external_id
        HAVING COUNT(DISTINCT c2.id) > 1
    ) s ON s.external_id = c.external_id
    """


def _distill_sql(*, with_shared: bool) -> TextClause:
    if with_shared:
        return text(DISTILL_SQL.format(shared="s.external_id IS NOT NULL", shared_join=SHARED_JOIN))
    return text(DISTILL_SQL.format(shared="FALSE", shared_join=""))


@dataclass
class DistillReport:
    """What was read and why items were left out (counts)."""

    seen: int = 0
    kept: int = 0
    low_confidence: int = 0
    not_confirmed: int = 0
    ambiguous: int = 0  # reviewed without a source, but more than one source holds the id
    bad_text: int = 0
    per_label: dict[str, int] = field(default_factory=dict)


def distilled_examples(
    url: str,
    *,
    task: str,
    min_confidence: float = 0.0,
    confirmed: Mapping[str, str] | GoldLabels | None = None,
) -> tuple[list[Example], DistillReport]:
    """Examples from `task`'s done results over conversations, in item order.

    Keeps results with a label and `confidence >= min_confidence` (a missing
    confidence counts as 1.0); with `confirmed` (GoldLabels from `load_gold`,
    or {external_id: reviewed label}) only items whose stored label the
    reviewer agreed with. A reviewed line names its item by (source,
    external_id); one without a source names the item only while one source
    alone holds the id, else the item is left out and counted in
    `ambiguous`. Each example's weight is its confidence. Audio items are not
    read (their text is another task's output). Raises ValueError for a floor
    outside [0, 1].
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    reviewed = None if confirmed is None else GoldLabels.of(confirmed)
    sql = _distill_sql(with_shared=bool(reviewed and reviewed.any_source))
    report = DistillReport()
    examples: list[Example] = []
    with get_engine(url).connect() as conn:
        rows = conn.execution_options(stream_results=True, yield_per=2000).execute(
            sql, {"task": task}
        )
        for row in rows.mappings():
            report.seen += 1
            conf = 1.0 if row["confidence"] is None else float(row["confidence"])
            if conf < min_confidence:
                report.low_confidence += 1
                continue
            if reviewed is not None:
                key = (row["source"], row["external_id"])
                if reviewed.is_ambiguous(*key, shared=row["shared"]):
                    report.ambiguous += 1
                    continue
                if reviewed.label_for(*key, shared=row["shared"]) != row["label"]:
                    report.not_confirmed += 1
                    continue
            try:
                body = conversation_text({"messages": row["messages"]}, max_chars=MAX_TEXT_CHARS)
            except InputError:
                report.bad_text += 1
                continue
            examples.append(Example(body, str(row["label"]), max(conf, 1e-3)))
            report.per_label[row["label"]] = report.per_label.get(row["label"], 0) + 1
    report.kept = len(examples)
    return examples, report


def describe(report: DistillReport, *, task: str, min_confidence: float) -> dict[str, Any]:
    """The report as plain data for metrics files and `--json`."""
    return {
        "from_task": task,
        "min_confidence": min_confidence,
        "seen": report.seen,
        "kept": report.kept,
        "below_min_confidence": report.low_confidence,
        "not_confirmed": report.not_confirmed,
        "ambiguous": report.ambiguous,
        "bad_text": report.bad_text,
        "per_label": dict(sorted(report.per_label.items())),
    }
