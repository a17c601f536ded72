"""What a cascade costs and how much it escalates, for `fleet status`, metrics and the report.

A task with `escalate_to` (workers.cascade) answers every item itself and gives
the unsure ones an item on the stronger task; discovery never gives the
stronger task items of its own (producer.drive), so the stronger task's work
items are exactly the escalations. The share and the stronger tier's state
therefore come from the ledger counts a status read already has; the cost is
the stronger tier's model time, the sum of its results' per-item latency (a
result's `latency_ms` is its sub-batch's time per item), read for the stronger
tasks only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

WAITING = ("pending", "queued", "running")
FAILED = ("failed", "dead", "parked", "gone")


@dataclass(frozen=True)
class CascadeStatus:
    """One cascade: `task` (the cheap one) escalating to `strong`.

    decided: items the cheap task has answered (done); escalated: items it sent
    to the stronger task; answered / waiting / failed: those items' state on the
    stronger task; strong_model_seconds: the stronger tier's model time over its
    answered items (None when it could not be read)."""

    task: str
    strong: str
    decided: int
    escalated: int
    answered: int
    waiting: int
    failed: int
    strong_model_seconds: float | None = None

    @property
    def share(self) -> float | None:
        """Escalated / decided (0-1); None before the cheap task answered anything."""
        return self.escalated / self.decided if self.decided else None

    @property
    def seconds_per_escalation(self) -> float | None:
        """The stronger tier's model seconds per item it answered (None: not known yet)."""
        if self.strong_model_seconds is None or not self.answered:
            return None
        return self.strong_model_seconds / self.answered

    def to_json(self) -> dict[str, Any]:
        return {
            "escalate_to": self.strong,
            "decided": self.decided,
            "escalated": self.escalated,
            "share": None if self.share is None else round(self.share, 4),
            "answered": self.answered,
            "waiting": self.waiting,
            "failed": self.failed,
            "strong_model_seconds": (
                None if self.strong_model_seconds is None else round(self.strong_model_seconds, 3)
            ),
            "seconds_per_escalation": (
                None
                if self.seconds_per_escalation is None
                else round(self.seconds_per_escalation, 4)
            ),
        }

    def line(self) -> str:
        """One line for people: share, the stronger tier's state and its cost."""
        share = "-" if self.share is None else f"{self.share:.1%}"
        cost = (
            "model time not read"
            if self.strong_model_seconds is None
            else f"{self.strong_model_seconds:,.1f} model-s"
            + (
                ""
                if self.seconds_per_escalation is None
                else f" ({self.seconds_per_escalation * 1000:,.1f} ms per item)"
            )
        )
        return (
            f"cascade {self.task} -> {self.strong}: {self.escalated:,} of {self.decided:,} "
            f"escalated ({share}); {self.answered:,} answered, {self.waiting:,} waiting, "
            f"{self.failed:,} failed (first label kept); stronger tier {cost}"
        )


def configured_cascades(config_file: Path | None) -> dict[str, str]:
    """{cheap task: stronger task} of the task config; {} when it cannot be read."""
    from config.taskconfig import ConfigError, load_tasks

    try:
        specs = load_tasks(config_file)
    except (ConfigError, OSError):
        return {}
    return {name: s.escalate_to for name, s in specs.items() if s.escalate_to}


def read_model_seconds(session: Session, tasks: Iterable[str]) -> dict[str, float]:
    """{task: sum of its done results' latency_ms / 1000} for `tasks` only."""
    names = sorted(set(tasks))
    if not names:
        return {}
    rows = session.execute(
        text(
            "SELECT w.task, COALESCE(sum(r.latency_ms), 0) / 1000.0 FROM work_items w "
            "JOIN results r ON r.work_item_id = w.id "
            "WHERE w.task = ANY(CAST(:tasks AS varchar[])) AND w.status = 'done' GROUP BY w.task"
        ),
        {"tasks": names},
    ).all()
    return {str(task): float(seconds) for task, seconds in rows}


def cascade_statuses(
    pairs: Mapping[str, str],
    counts: Mapping[str, Mapping[str, int]],
    model_seconds: Mapping[str, float] | None,
) -> dict[str, CascadeStatus]:
    """Each cascade's figures from the ledger counts ({task: {status: items}}) and the
    stronger tasks' model seconds (None: not read; a task absent: none answered yet)."""
    out = {}
    for task, strong in sorted(pairs.items()):
        mine, theirs = counts.get(task, {}), counts.get(strong, {})
        out[task] = CascadeStatus(
            task=task,
            strong=strong,
            decided=int(mine.get("done", 0)),
            escalated=int(sum(theirs.values())),
            answered=int(theirs.get("done", 0)),
            waiting=int(sum(theirs.get(s, 0) for s in WAITING)),
            failed=int(sum(theirs.get(s, 0) for s in FAILED)),
            strong_model_seconds=(
                None if model_seconds is None else model_seconds.get(strong, 0.0)
            ),
        )
    return out


def read_cascades(session: Session, tasks: Iterable[str]) -> dict[str, CascadeStatus]:
    """Every cascade among `tasks` that has escalated anything, from the data alone
    (a result's `output.escalated_to` names the stronger task), with its figures;
    for the report, which reads a database without the task config."""
    from db import ledger

    names = sorted(set(tasks))
    if not names:
        return {}
    pairs = {
        str(task): str(strong)
        for task, strong in session.execute(
            text(
                "SELECT DISTINCT w.task, r.output ->> 'escalated_to' FROM work_items w "
                "JOIN results r ON r.work_item_id = w.id "
                "WHERE w.task = ANY(CAST(:tasks AS varchar[])) AND r.output ? 'escalated_to'"
            ),
            {"tasks": names},
        ).all()
    }
    if not pairs:
        return {}
    counts = ledger.counts(session)
    return cascade_statuses(pairs, counts, read_model_seconds(session, pairs.values()))


def cascade_table(cascades: Mapping[str, CascadeStatus]) -> str:
    """An HTML table of the cascades (empty string when there are none)."""
    from html import escape

    if not cascades:
        return ""
    rows = []
    for c in cascades.values():
        share = "-" if c.share is None else f"{c.share:.1%}"
        cost = "-" if c.strong_model_seconds is None else f"{c.strong_model_seconds:,.1f}"
        per = "-" if c.seconds_per_escalation is None else f"{c.seconds_per_escalation * 1000:,.1f}"
        rows.append(
            f'<tr data-task="{escape(c.task)}"><td>{escape(c.task)}</td><td>{escape(c.strong)}</td>'
            f"<td>{c.decided:,}</td><td>{c.escalated:,}</td><td>{share}</td>"
            f"<td>{c.answered:,}</td><td>{c.waiting:,}</td><td>{c.failed:,}</td>"
            f"<td>{cost}</td><td>{per}</td></tr>"
        )
    return (
        '<table class="summary cascade"><tr><th>task</th><th>escalates to</th><th>answered</th>'
        "<th>escalated</th><th>share</th><th>stronger answered</th><th>waiting</th>"
        "<th>failed (first label kept)</th><th>stronger model-s</th><th>ms per escalation</th>"
        "</tr>" + "".join(rows) + "</table>"
    )
