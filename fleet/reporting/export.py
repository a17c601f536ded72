"""Export, evaluation and model comparison over stored results."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import IO, Any

from fleet.reporting.queries import iter_results
from fleet.reporting.scoring import classification_report, percentile

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
    """Write results as JSONL or CSV to `out`, or one JSON file per item into a folder."""
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
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            )
        elif out is not None:
            out.write(json.dumps(row, default=str) + "\n")
    return n


def load_gold(path: Path) -> dict[str, str]:
    """JSONL of {"external_id", "label"} (or "gold"/"intent"); bad lines raise with the line number."""
    gold: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                label = obj.get("label", obj.get("gold", obj.get("intent")))
                gold[str(obj["external_id"])] = str(label)
                if label is None:
                    raise KeyError("label")
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: expected {{'external_id', 'label'}}: {e}"
                ) from None
    return gold


def evaluate(
    url: str, *, task: str, gold: dict[str, str], source: str | None = None
) -> dict[str, Any]:
    """Score a task's stored results against gold labels ({external_id: label}).

    Returns classification_report's dict plus latency_ms {mean, p50, p95},
    not_in_task (gold ids with no item), not_done, and ambiguous: gold ids that
    more than one source holds (external_id is unique per source only), which
    are not scored; pass `source` (a `[sources.<name>]` name, or 'ingest') to
    score one source's items and leave the rest out."""
    rows: dict[str, dict[str, Any]] = {}
    shared: set[str] = set()
    for r in iter_results(url, task=task, source=source):
        eid = str(r["external_id"])
        if eid in rows and rows[eid]["source"] != r["source"]:
            shared.add(eid)
        rows[eid] = r
    ambiguous = [eid for eid in gold if eid in shared]
    missing = [eid for eid in gold if eid not in rows]
    ids = [eid for eid in gold if eid in rows and eid not in shared]
    truth = [gold[i] for i in ids]
    report = classification_report(truth, [rows[i]["label"] for i in ids], sorted(set(truth)))
    latencies = [rows[i]["latency_ms"] for i in ids if rows[i]["latency_ms"] is not None]
    report["latency_ms"] = {
        "mean": sum(latencies) / len(latencies) if latencies else 0.0,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
    }
    report["not_in_task"] = len(missing)
    report["ambiguous"] = len(ambiguous)
    report["not_done"] = sum(1 for i in ids if rows[i]["status"] != "done")
    return report
