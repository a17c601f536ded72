"""The report's "Reviews" section: how often reviewers agreed with the model, per label.

Read over every confirmed label of the report's tasks (not only the window's):
`agreed` counts reviews whose label equals the model answer they reviewed.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from sqlalchemy.orm import Session

from db.review import agreement

Agreement = dict[str, dict[str, dict[str, int]]]  # task -> label -> {reviewed, agreed}


def read_agreement(session: Session, tasks: Iterable[str]) -> Agreement:
    """{task: {label: {"reviewed": n, "agreed": k}}} for the tasks with any review."""
    out: Agreement = {}
    for task in tasks:
        per = agreement(session, task=task)
        if per:
            out[task] = per
    return out


def agreement_table(review: Agreement) -> str:
    """An HTML table: task, reviewer's label, reviewed, agreed, agreement %."""
    if not review:
        return (
            '<p class="note">No confirmed labels yet (`fleet review export`, then '
            "`fleet review import`).</p>"
        )
    rows = []
    for task, per in sorted(review.items()):
        for label, c in sorted(per.items()):
            pct = 100.0 * c["agreed"] / c["reviewed"] if c["reviewed"] else 0.0
            rows.append(
                f'<tr data-task="{escape(task)}" data-label="{escape(label)}"><td>{escape(task)}</td>'
                f"<td>{escape(label)}</td><td>{c['reviewed']}</td><td>{c['agreed']}</td>"
                f"<td>{pct:.0f} %</td></tr>"
            )
    return (
        '<table class="summary review"><tr><th>task</th><th>reviewer\'s label</th>'
        "<th>reviewed</th><th>model agreed</th><th>agreement</th></tr>" + "".join(rows) + "</table>"
    )
