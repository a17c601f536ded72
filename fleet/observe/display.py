"""What people see: progress bars, live status and tables (rich)."""

from __future__ import annotations

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


def counts_table(counts: dict[str, dict[str, int]]) -> None:
    table = Table(title="work items")
    table.add_column("task")
    for s in STATUSES:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for task, c in sorted(counts.items()):
        table.add_row(task, *[str(c.get(s, 0)) for s in STATUSES], str(sum(c.values())))
    out.print(table)


def results_table(rows: list[dict[str, Any]], *, title: str, gold: bool = False) -> None:
    table = Table(title=title)
    for col in ("external_id", "status", "label", "confidence", "model", "tier", "detail"):
        table.add_column(
            col,
            overflow="fold",
            max_width=60 if col == "detail" else None,
            no_wrap=col in ("external_id", "model"),
        )
    for r in rows:
        conf = r.get("confidence")
        detail = r.get("error") or r.get("detail") or ""
        table.add_row(
            str(r["external_id"]),
            r["status"],
            str(r.get("label") or ""),
            f"{conf:.2f}" if isinstance(conf, float) else "",
            str(r.get("model_name") or ""),
            "" if r.get("model_tier") is None else str(r["model_tier"]),
            str(detail),
        )
    out.print(table)


def confusion_table(confusion: dict[str, dict[str, int]]) -> None:
    labels = list(confusion)
    table = Table(title="confusion (rows: gold, columns: predicted)")
    table.add_column("gold")
    for lab in labels:
        table.add_column(lab[:10], justify="right")
    for g in labels:
        table.add_row(g, *[str(confusion[g].get(p, 0)) for p in labels])
    out.print(table)
