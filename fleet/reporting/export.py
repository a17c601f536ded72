"""Export, evaluation and model comparison over stored results."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleet.reporting.queries import iter_results, task_sources
from fleet.reporting.scoring import (
    classification_report,
    expected_calibration_error,
    multilabel_report,
    percentile,
    reliability_bins,
)
from workers.multilabel import join_labels, split_labels

EXPORT_COLUMNS = (
    "external_id",
    "source",  # external_id is unique per source only ('ingest': `fleet ingest` rows)
    "source_kind",
    "task",
    "status",
    "label",
    "confidence",
    "scores",
    "output",
    "model_name",
    "model_tier",
    "device",
    "latency_ms",
    "error",
)


# Cells a spreadsheet reads as a formula (OWASP "CSV Injection"): = + - @, and a
# leading tab or carriage return, which some spreadsheets strip before parsing.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """`value` for a CSV cell that a spreadsheet will not evaluate.

    A string starting with one of FORMULA_TRIGGERS gets a leading `'`, as
    OWASP's CSV Injection page recommends (a spreadsheet shows it as text);
    numbers and None pass unchanged (-0.5 is a number, not a formula).
    Source: https://owasp.org/www-community/attacks/CSV_Injection
    """
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def _safe_name(external_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", external_id).strip("._") or "item"
    return name[:200]


def export(
    url: str,
    *,
    task: str,
    fmt: str,
    out: IO[str] | None,
    status: str = "all",
    individual_dir: Path | None = None,
) -> int:
    """Write results as JSONL or CSV to `out`, or one JSON file per item into a folder.

    CSV cells pass through spreadsheet_safe (a leading `'` on text a
    spreadsheet would run as a formula); JSONL and JSON files hold values as
    stored."""
    n = 0
    writer: Any = None
    if fmt == "csv" and out is not None and individual_dir is None:
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
    used: set[str] = set()
    for full in iter_results(url, task=task, status=status):
        row = {k: full[k] for k in EXPORT_COLUMNS}
        n += 1
        if individual_dir is not None:
            individual_dir.mkdir(parents=True, exist_ok=True)
            name = _safe_name(str(row["external_id"]))
            if name in used:  # ids that sanitize alike, or one id of two sources: distinct files
                name = f"{name}-{n}"
            used.add(name)
            (individual_dir / f"{name}.json").write_text(
                json.dumps(row, indent=2, default=str) + "\n"
            )
        elif writer is not None:
            writer.writerow(
                {
                    k: spreadsheet_safe(json.dumps(v) if isinstance(v, dict | list) else v)
                    for k, v in row.items()
                }
            )
        elif out is not None:
            out.write(json.dumps(row, default=str) + "\n")
    return n


@dataclass(frozen=True)
class GoldLabels:
    """Reviewed labels of stored items, as `load_gold` reads them.

    external_id is unique per source only, so a line may name its `source`
    (a `[sources.<name>]` name, or 'ingest' for rows `fleet ingest` read, as
    exports write it). `per_source` maps (source, external_id) -> label for
    lines that do; `any_source` maps external_id -> label for lines that do
    not, which match an item only while one source alone holds that id.
    """

    any_source: dict[str, str] = field(default_factory=dict)
    per_source: dict[tuple[str, str], str] = field(default_factory=dict)
    # True when a line gave a label list ("labels": [...]): its label is the set
    # joined with ";" in sorted order, as a multi-label result's `label` column.
    multi_label: bool = False

    @classmethod
    def of(cls, labels: Mapping[str, str] | GoldLabels) -> GoldLabels:
        """`labels` as GoldLabels: a plain {external_id: label} mapping names no source."""
        if isinstance(labels, GoldLabels):
            return labels
        return cls(any_source={str(k): str(v) for k, v in labels.items()})

    def __len__(self) -> int:
        return len(self.any_source) + len(self.per_source)

    def ids(self) -> set[str]:
        """Every external_id a line names, with or without a source."""
        return set(self.any_source) | {eid for _, eid in self.per_source}

    def label_for(self, source: str, external_id: str, *, shared: bool) -> str | None:
        """The reviewed label of the stored item (source, external_id), or None.

        The line naming that source wins; else a line without a source, unless
        `shared` (more than one source holds the id: the line could mean
        either item, see `is_ambiguous`)."""
        label = self.per_source.get((source, external_id))
        if label is not None:
            return label
        return None if shared else self.any_source.get(external_id)

    def is_ambiguous(self, source: str, external_id: str, *, shared: bool) -> bool:
        """True when only a line without a source names an id that more than one source holds."""
        return (
            shared
            and (source, external_id) not in self.per_source
            and external_id in self.any_source
        )


def load_gold(path: Path) -> GoldLabels:
    """JSONL of {"external_id", "label"} (or "gold"/"intent"), optionally "source".

    A multi-label task's lines give `"labels": [...]` (possibly empty: no label
    applies) instead; the set is kept joined with ";" in sorted order and the
    result's `multi_label` is set.

    "source" says whose item a line is about: a `[sources.<name>]` name, or
    'ingest' for `fleet ingest` rows (an export's lines carry it); without it
    (or null) a line applies to the one source holding the id. Raises
    ValueError with the line number for a bad line, a source that is not a
    non-empty string, or an id given both with and without a source.
    """
    gold = GoldLabels()
    multi = False
    where_any: dict[str, int] = {}
    where_sourced: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not a JSON object ({e.msg}); each line is "
                    '{"external_id": "...", "label": "..."}'
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object such as "
                    f'{{"external_id": "c1", "label": "social"}}, got {line.strip()[:80]}'
                )
            label = obj.get("label", obj.get("gold", obj.get("intent")))
            if "labels" in obj:
                names = obj["labels"]
                if not isinstance(names, list) or not all(
                    isinstance(n, str) and n.strip() for n in names
                ):
                    raise ValueError(
                        f"{path}:{lineno}: 'labels' must be a list of label names ([] when "
                        f"none applies): {line.strip()[:80]}"
                    )
                label = join_labels([n.strip() for n in names]) or ""
                multi = True
            if obj.get("external_id") is None:
                raise ValueError(
                    f"{path}:{lineno}: this line has no external_id (the id of the item it "
                    f"labels): {line.strip()[:80]}"
                )
            if "labels" not in obj and (
                label is None or (isinstance(label, str) and not label.strip())
            ):
                raise ValueError(
                    f'{path}:{lineno}: this line has no label (give "label", "gold" or '
                    f'"intent"): {line.strip()[:80]}'
                )
            eid = str(obj["external_id"])
            source = obj.get("source")
            if source is not None and (not isinstance(source, str) or not source.strip()):
                raise ValueError(
                    f"{path}:{lineno}: 'source' must be a source's name ('ingest' for "
                    f"`fleet ingest` rows) or left out, got {source!r}"
                )
            if source is None:
                gold.any_source[eid] = str(label)
                where_any.setdefault(eid, lineno)
            else:
                gold.per_source[(source.strip(), eid)] = str(label)
                where_sourced.setdefault(eid, lineno)
            if eid in where_any and eid in where_sourced:
                raise ValueError(
                    f"{path}:{lineno}: external_id {eid!r} is given with a source (line "
                    f"{where_sourced[eid]}) and without one (line {where_any[eid]}); give "
                    "every line of it a 'source'"
                )
    return GoldLabels(gold.any_source, gold.per_source, multi_label=multi)


def calibration_summary(
    gold: list[str], rows: list[dict[str, Any]], *, multi_label: bool = False
) -> dict[str, Any]:
    """ECE (10 bins) and the reliability bins of stored results against their gold labels,
    and how many came from a model without calibration (`output.calibrated` false).

    Rows without a confidence (failed, or a kind that gives none) are left out of the
    ECE and counted in `no_confidence`. `multi_label`: a result is right when its
    label set is the gold set (an empty set, label NULL, included), its confidence
    being the probability of that set (workers.multilabel)."""
    conf: list[float] = []
    correct: list[bool] = []
    uncalibrated = no_confidence = 0
    for g, r in zip(gold, rows, strict=True):
        if r.get("confidence") is None or (r.get("label") is None and not multi_label):
            no_confidence += 1
            continue
        conf.append(float(r["confidence"]))
        if multi_label:
            correct.append(split_labels(r.get("label")) == split_labels(g))
        else:
            correct.append(r["label"] == g)
        if (r.get("output") or {}).get("calibrated") is False:
            uncalibrated += 1
    return {
        "ece": expected_calibration_error(conf, correct),
        "reliability": reliability_bins(conf, correct),
        "mean_confidence": sum(conf) / len(conf) if conf else 0.0,
        "uncalibrated": uncalibrated,
        "no_confidence": no_confidence,
    }


def label_set_report(
    gold: Sequence[str], rows: Sequence[dict[str, Any]], model_labels: Sequence[str] = ()
) -> dict[str, Any]:
    """`multilabel_report` of stored results against gold label sets (joined with ";",
    as `load_gold` keeps them): a result's set is its `output.labels`, else its
    `label` split on ";"; a result not done (or without an answer) is a missing
    prediction. Per-label figures run over the task's labels, the labels in the
    results' scores and the gold's."""
    predicted: list[list[str] | None] = []
    names = set(model_labels)
    for r in rows:
        names.update(r.get("scores") or {})
        out = r.get("output") or {}
        if r.get("status") != "done":
            predicted.append(None)
        elif isinstance(out.get("labels"), list):
            predicted.append([str(n) for n in out["labels"]])
        else:
            predicted.append(split_labels(r.get("label")))
    sets = [split_labels(g) for g in gold]
    for s in sets:
        names.update(s)
    return multilabel_report(sets, predicted, sorted(names))


def evaluate(
    url: str,
    *,
    task: str,
    gold: Mapping[str, str] | GoldLabels,
    source: str | None = None,
    model_labels: Sequence[str] = (),
) -> dict[str, Any]:
    """Score a task's stored results against gold labels (GoldLabels, or {external_id: label}).

    unknown_gold_labels ({label: lines}): gold labels the model cannot give,
    judged against `model_labels` (the task's label set) and the labels in the
    stored results' scores; such lines can only count as errors.

    Returns classification_report's dict plus latency_ms {mean, p50, p95},
    not_in_task (gold lines with no item), not_done, ambiguous and
    other_source. ambiguous: gold lines without a source whose id more than
    one source holds (external_id is unique per source only); they are not
    scored: pass `source` (a `[sources.<name>]` name, or 'ingest') to score
    one source's items and leave the rest out, or name the source in the
    gold lines. other_source: lines naming a source other than `source`,
    left out.

    Raises ValueError when `source` is given and none of the task's items
    comes from it (a misspelt name would otherwise score nothing), naming the
    sources its items do come from."""
    labels = GoldLabels.of(gold)
    wanted = labels.ids()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    holders: dict[str, set[str]] = {}
    seen = False
    for r in iter_results(url, task=task, source=source):
        seen = True
        eid = str(r["external_id"])
        if eid not in wanted:  # only gold ids are kept: a task may hold millions
            continue
        rows[(str(r["source"]), eid)] = r
        holders.setdefault(eid, set()).add(str(r["source"]))
    if source is not None and not seen:
        known = task_sources(url, task=task)
        raise ValueError(
            f"no item of task {task!r} comes from source {source!r}; its items come from "
            + (", ".join(repr(k) for k in known) if known else "no source yet (nothing discovered)")
            + " ('ingest' is rows read by `fleet ingest`). Pass one of those to --source."
        )
    scored: list[tuple[str, dict[str, Any]]] = []  # (gold label, stored row)
    missing = ambiguous = other_source = 0
    for eid, label in labels.any_source.items():
        held = holders.get(eid, set())
        if len(held) > 1:
            ambiguous += 1
        elif held:
            scored.append((label, rows[(next(iter(held)), eid)]))
        else:
            missing += 1
    for (src, eid), label in labels.per_source.items():
        if source is not None and src != source:
            other_source += 1
        elif (src, eid) in rows:
            scored.append((label, rows[(src, eid)]))
        else:
            missing += 1
    truth = [g for g, _ in scored]
    multi = labels.multi_label or any((r.get("output") or {}).get("multi_label") for _, r in scored)
    if multi:
        report = label_set_report(truth, [r for _, r in scored], model_labels)
    else:
        report = classification_report(truth, [r["label"] for _, r in scored], sorted(set(truth)))
    # A result's latency_ms is its sub-batch's time per item: the items of one
    # forward pass share it. Percentiles are over items; `sub_batches` says how
    # many distinct values they come from (one: p50 = p95 = that mean, and the
    # command says so instead of showing them).
    latencies = [r["latency_ms"] for _, r in scored if r["latency_ms"] is not None]
    report["latency_ms"] = {
        "mean": sum(latencies) / len(latencies) if latencies else 0.0,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "sub_batches": len(set(latencies)),
    }
    can_give = set(model_labels)
    for _, r in scored:
        can_give.update(r.get("scores") or {})
        if r.get("label") is not None:
            can_give.add(str(r["label"]))
    given = [n for g in truth for n in split_labels(g)] if multi else truth
    report["unknown_gold_labels"] = dict(
        sorted(Counter(g for g in given if can_give and g not in can_give).items())
    )
    report.update(calibration_summary(truth, [r for _, r in scored], multi_label=multi))
    report["not_in_task"] = missing
    report["ambiguous"] = ambiguous
    report["other_source"] = other_source
    report["not_done"] = sum(1 for _, r in scored if r["status"] != "done")
    return report
