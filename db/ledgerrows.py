"""The ledger's values: what a claim, a start and a finish hand over, and the
typed result row a worker writes for an item (db.ledger, workers.pipeline)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import CursorResult


def id_array(ids: Iterable[int]) -> str:
    """A Postgres array literal (`{1,2,3}`) for a `CAST(:ids AS bigint[])` parameter.

    Built with one str.join (C speed): psycopg dumps a Python list element by
    element in Python, about 0.55 us of CPU per id against 0.10 us for this,
    and the hot paths pass every item's id two or three times (claim, start,
    finish; bench.ceiling prints the CPU per item). Every id goes through
    int(), so the literal only ever holds integers; something that is not one
    raises TypeError or ValueError.
    """
    return "{" + ",".join(map(str, map(int, ids))) + "}"


def _rowcount(result: Any) -> int:
    """Rows an UPDATE/INSERT touched (a CursorResult's rowcount; -1 means unknown)."""
    count = result.rowcount if isinstance(result, CursorResult) else -1
    return max(count, 0)


@dataclass(frozen=True)
class ClaimedBatch:
    """A batch a claim cut: its id (a uuid string) and its item ids, ascending."""

    batch_id: str
    item_ids: tuple[int, ...]


@dataclass(frozen=True)
class StartedItem:
    """An item a start handed to the worker. `deliveries_before` > 0: workers
    died on it before (each death found is counted on the item), which is what
    poison isolation (workers.policy.poison_plan) reads."""

    item_id: int
    source_kind: str
    source_id: int
    deliveries_before: int


@dataclass(frozen=True)
class ResultRow:
    """One item's result as the results table stores it (without work_item_id).

    `confidence` is in [0, 1] or None; `scores` maps label -> score; `output`
    holds what else the adapter returned (notes, escalation, an LLM's raw
    answer); `latency_ms` is the item's share of its sub-batch's model time, in
    milliseconds; `model_tier` 0 is the strongest tier. NaN or infinity inside
    scores or output cannot be stored (JSON): finish_batch raises ValueError.
    """

    model_name: str
    model_tier: int
    device: str
    latency_ms: float
    label: str | None = None
    confidence: float | None = None
    scores: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    model_revision: str | None = None

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> ResultRow:
        """A ResultRow from a mapping with the same keys (unknown keys raise TypeError)."""
        names = {f.name for f in fields(cls)}
        extra = set(row) - names
        if extra:
            raise TypeError(f"a result row has no field(s) {sorted(extra)}; known: {sorted(names)}")
        return cls(**dict(row))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """What the worker made of one item. `result` is its ResultRow (a mapping
    with the same keys is converted); `error` marks the item failed (a result
    may still be kept, e.g. an LLM's raw invalid output)."""

    item_id: int
    result: ResultRow | None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.result is not None and not isinstance(self.result, ResultRow):
            object.__setattr__(self, "result", ResultRow.from_mapping(self.result))


@dataclass(frozen=True)
class FinishCounts:
    done: int
    failed: int
    skipped: int  # no longer leased to this batch (finished before, or reclaimed)


def _float(value: Any) -> Any:
    """JSON has no NaN or infinity: those travel as the strings Postgres reads
    them from ("NaN", "Infinity", "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def results_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array; a NaN inside scores or output names its item."""
    try:
        return json.dumps(rows, allow_nan=False)
    except ValueError:
        for r in rows:
            try:
                json.dumps([r["scores"], r["output"]], allow_nan=False)
            except ValueError:
                raise ValueError(
                    f"work item {r['work_item_id']}: its result's scores or output hold NaN "
                    "or infinity, which JSON cannot store; the adapter must replace them"
                ) from None
        raise


def result_rows(outcomes: Iterable[Outcome]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """The outcomes' results as JSON-ready rows and the model columns.

    The model columns (name, revision, tier, device) are the same for a whole
    chunk (a few tiers at most, after an out-of-memory step down): they travel
    once per model, as four arrays, and each row names its model by number
    (`m`, from 1), so the JSON holds what differs per item."""
    models: dict[tuple[Any, ...], int] = {}
    rows = []
    for o in outcomes:
        r = o.result
        if r is None:
            continue
        model = (r.model_name, r.model_revision, r.model_tier, r.device)
        rows.append(
            {
                "work_item_id": o.item_id,
                "label": r.label,
                "confidence": _float(r.confidence),
                "scores": r.scores,
                "output": r.output,
                "latency_ms": _float(r.latency_ms),
                "m": models.setdefault(model, len(models) + 1),
            }
        )
    columns = [list(c) for c in zip(*models, strict=True)] if models else [[], [], [], []]
    return rows, columns


RESULT_COLUMNS = (
    "work_item_id, label, confidence, scores, output, "
    "model_name, model_revision, model_tier, device, latency_ms"
)
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _text(value: Any) -> str:
    """One field of COPY's text format: NULL is \\N, the rest escaped."""
    if value is None:
        return "\\N"
    return str(value).translate(_ESCAPES)


def copy_text(outcomes: Iterable[Outcome], only: set[int]) -> str:
    """The results of the outcomes whose item is in `only`, as the rows of
    `COPY results (RESULT_COLUMNS) FROM STDIN` (text format, one line each).

    Raises ValueError, naming the item, when its scores or output hold NaN or
    infinity (JSON cannot store them)."""
    lines = []
    for o in outcomes:
        r = o.result
        if r is None or o.item_id not in only:
            continue
        try:
            scores = None if r.scores is None else _JSON.encode(r.scores)
            output = None if r.output is None else _JSON.encode(r.output)
        except ValueError:
            raise ValueError(
                f"work item {o.item_id}: its result's scores or output hold NaN "
                "or infinity, which JSON cannot store; the adapter must replace them"
            ) from None
        fields_ = (
            o.item_id,
            r.label,
            _float(r.confidence),
            scores,
            output,
            r.model_name,
            r.model_revision,
            r.model_tier,
            r.device,
            _float(r.latency_ms),
        )
        lines.append("\t".join(map(_text, fields_)))
    return "".join(line + "\n" for line in lines)
