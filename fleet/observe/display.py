"""What people see: progress bars, live status and tables (rich)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

STATUSES = ("pending", "queued", "running", "done", "failed", "dead", "parked", "gone")
console = Console(stderr=True)
out = Console()


@contextmanager
def byte_progress(
    total: int, label: str, *, quiet: bool = False
) -> Iterator[Callable[[int], None]]:
    if quiet:
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as p:
        tid = p.add_task(label, total=total)
        yield lambda n: p.advance(tid, n)


@contextmanager
def item_progress(label: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    if quiet:
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.completed} items"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as p:
        tid = p.add_task(label, total=None)
        yield lambda n: p.advance(tid, n)


@contextmanager
def run_progress(
    tasks: Sequence[str], *, quiet: bool = False, workers: Mapping[str, str] | None = None
) -> Iterator[Callable[[dict[str, dict[str, int]]], None]]:
    """One bar per task: finished (done+failed+dead) of all, with a live status line.

    `workers` (task -> what its local worker is doing, kept up to date by
    fleet.ops.localworkers) adds a column read at every update."""
    if quiet:
        yield lambda counts: None
        return
    columns = [
        TextColumn("{task.description:14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    ]
    if workers is not None:
        columns.append(TextColumn("{task.fields[worker]}", style="cyan"))
    with Progress(*columns, console=console) as p:
        ids = {t: p.add_task(t, total=None, status="", worker="") for t in tasks}

        def update(counts: dict[str, dict[str, int]]) -> None:
            for t, tid in ids.items():
                c = counts.get(t, {})
                total = sum(c.values())
                finished = sum(c.get(s, 0) for s in ("done", "failed", "dead", "parked", "gone"))
                status = " ".join(f"{s}={c[s]}" for s in STATUSES if c.get(s))
                note = (workers or {}).get(t, "")
                p.update(tid, total=total or None, completed=finished, status=status, worker=note)

        yield update


_DIGITS = re.compile(r"(\d+)")


def natural_key(value: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the digit runs of `value` as numbers: c2 < c10 < d1."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in _DIGITS.split(value)
        if part
    )


def _whole(table: Table, name: str, values: Sequence[str], **options: Any) -> None:
    """A column whose values never wrap (names, labels, ids): as wide as its longest value."""
    width = max([len(name), *(len(v) for v in values)])
    table.add_column(name, no_wrap=True, min_width=width, **options)


def counts_table(counts: dict[str, dict[str, int]]) -> None:
    """Items per task and status: only the statuses some task has (so a table
    fits 80 columns), task names whole."""
    shown = [s for s in STATUSES if any(c.get(s) for c in counts.values())]
    table = Table(title="work items")
    _whole(table, "task", list(counts))
    for s in shown:
        _whole(table, s, [str(c.get(s, 0)) for c in counts.values()], justify="right")
    table.add_column("total", justify="right", no_wrap=True)
    for task, c in sorted(counts.items()):
        table.add_row(task, *[str(c.get(s, 0)) for s in shown], str(sum(c.values())))
    out.print(table)


def results_table(rows: list[dict[str, Any]], *, title: str, gold: bool = False) -> None:
    """One line per item, ordered by source then external id (naturally: c2
    before c10). Ids, sources, statuses, labels and model names never wrap; the
    detail column takes what width is left and wraps between words."""
    rows = sorted(
        rows, key=lambda r: (str(r.get("source") or ""), natural_key(str(r["external_id"])))
    )
    cells = [
        (
            str(r["external_id"]),
            str(r.get("source") or ""),
            str(r["status"]),
            _label_cell(r),
            f"{r['confidence']:.2f}" if isinstance(r.get("confidence"), float) else "",
            str(r.get("model_name") or ""),
            "" if r.get("model_tier") is None else str(r["model_tier"]),
            str(r.get("error") or r.get("detail") or (r.get("output") or {}).get("no_label") or ""),
        )
        for r in rows
    ]
    table = Table(title=title)
    names = ("external_id", "source", "status", "label", "confidence", "model", "tier")
    for i, col in enumerate(names):
        _whole(table, col, [c[i] for c in cells])
    table.add_column("detail", overflow="fold", max_width=60)
    for c in cells:
        table.add_row(*c)
    out.print(table)


def _label_cell(r: dict[str, Any]) -> str:
    """A result's label; a multi-label result's set (labels joined with ";"), or
    "(none)" when it kept no label (the detail column says how close it came)."""
    out = r.get("output") or {}
    if r.get("label") is None and isinstance(out, dict) and out.get("multi_label"):
        return "(none)"
    return str(r.get("label") or "")


def confusion_table(confusion: dict[str, dict[str, int]]) -> None:
    labels = list(confusion)
    table = Table(title="confusion (rows: gold, columns: predicted)")
    table.add_column("gold")
    for lab in labels:
        table.add_column(lab[:10], justify="right")
    for g in labels:
        table.add_row(g, *[str(confusion[g].get(p, 0)) for p in labels])
    out.print(table)


def per_label_table(per_label: dict[str, dict[str, float]]) -> None:
    """A multi-label evaluation's per-label precision, recall, F1, gold support and
    how often the label was given."""
    table = Table(title="per label")
    for col in ("label", "precision", "recall", "F1", "support", "given"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for name, m in per_label.items():
        table.add_row(
            name,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            str(int(m["support"])),
            str(int(m.get("predicted", 0))),
        )
    out.print(table)
