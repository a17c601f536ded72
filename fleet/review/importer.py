"""`fleet review import FILE`: reviewed labels into confirmed_labels, each line judged alone.

Reads a Label Studio JSON export (a list of tasks with `annotations`, see
fleet.review.labelstudio) or JSONL lines {"source", "external_id", "task",
"label", "reviewer"}. A line with an unknown task, an unknown label, an id no
item of the task has, an id two sources hold without a "source", or no usable
annotation is reported with its reason; every other line is stored, in one
transaction per task. A stored label remembers the model answer it confirmed
or corrected, and ends the item's review hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from db import review as rq
from db.engine import transaction
from fleet.review import labelstudio as ls


@dataclass
class ImportReport:
    """Counts, and every line not imported with why (file position, reason)."""

    read: int = 0
    imported: int = 0
    confirmed: int = 0  # the reviewer gave the stored answer
    corrected: int = 0  # the reviewer gave another label
    problems: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """Plain data for --json."""
        return {
            "read": self.read,
            "imported": self.imported,
            "confirmed": self.confirmed,
            "corrected": self.corrected,
            "problems": [{"where": w, "reason": r} for w, r in self.problems],
        }


def read_reviewed(path: Path) -> list[ls.Reviewed]:
    """Every reviewed line of a Label Studio export (JSON list) or a JSONL file.

    Raises ValueError for a file that is neither (its name and what to give)."""
    body = path.read_text(encoding="utf-8")
    if body.lstrip().startswith("["):
        try:
            return ls.read_export(json.loads(body), where=path.name)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); give a Label Studio JSON export"
            ) from None
    out = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(ls.Reviewed(where, None, None, None, None, None, f"not JSON ({e.msg})"))
            continue
        out.append(ls.read_jsonl_line(obj, where=where))
    return out


def import_reviewed(
    url: str,
    reviewed: Sequence[ls.Reviewed],
    *,
    label_sets: Mapping[str, Sequence[str] | None],
    default_task: str | None = None,
    origin: str | None = None,
) -> ImportReport:
    """Store the usable lines; report the rest. `label_sets`: {task: its labels, or
    None where the task declares none (then any label is taken)}."""
    report = ImportReport(read=len(reviewed))
    by_task: dict[str, list[ls.Reviewed]] = {}
    for r in reviewed:
        task = r.task or default_task
        if r.problem:
            report.problems.append((r.where, r.problem))
        elif task is None:
            report.problems.append((r.where, "no task: give --task or a 'task' field"))
        elif task not in label_sets:
            report.problems.append(
                (r.where, f"unknown task {task!r}; tasks: {', '.join(sorted(label_sets))}")
            )
        elif (labels := label_sets[task]) is not None and r.label not in labels:
            report.problems.append(
                (
                    r.where,
                    f"unknown label {r.label!r} for task {task!r}; labels: {', '.join(labels)}",
                )
            )
        else:
            by_task.setdefault(task, []).append(r)
    for task, lines in by_task.items():
        with transaction(url) as session:
            found = rq.resolve_items(
                session, task=task, keys=[(r.source, str(r.external_id)) for r in lines]
            )
            todo: dict[int, rq.Confirmation] = {}
            for r in lines:
                refs = found.get((r.source, str(r.external_id)), [])
                if not refs:
                    where = f" in source {r.source!r}" if r.source else ""
                    report.problems.append(
                        (r.where, f"unknown id {r.external_id!r}{where}: no item of task {task!r}")
                    )
                elif len(refs) > 1:
                    report.problems.append(
                        (
                            r.where,
                            f"id {r.external_id!r} is held by sources "
                            f"{', '.join(sorted(x.source for x in refs))}: give the line a 'source'",
                        )
                    )
                else:
                    todo[refs[0].item_id] = rq.Confirmation(refs[0], str(r.label), r.reviewer)
            rq.confirm(session, task=task, confirmations=list(todo.values()), origin=origin)
        report.imported += len(todo)
        report.confirmed += sum(1 for c in todo.values() if c.item.model_label == c.label)
        report.corrected += sum(1 for c in todo.values() if c.item.model_label != c.label)
    return report
