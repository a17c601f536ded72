"""The report's view of multi-label tasks: how often each label was given over time.

A multi-label result (`output.multi_label`, workers.multilabel) carries its label
set in `output.labels`; its `label` column is the set joined with ";", so the
report's label bars show combinations. This section shows each label on its
own: per throughput bin, the share of the task's done items (in the window, and
results replaced since: the same outcomes as the rest of the page) that were
given it, and the share given none.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from html import escape
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from fleet.reporting import charts

NO_LABEL = "(none)"


@dataclass
class LabelRates:
    """One multi-label task's counts per bin: items done, and items given each label
    (`NO_LABEL`: given an empty set)."""

    items: list[int]
    labels: dict[str, list[int]] = field(default_factory=dict)

    def rates(self) -> dict[str, list[float | None]]:
        """Share of each bin's items given each label (None for a bin without items)."""
        return {
            name: [c / n if n else None for c, n in zip(counts, self.items, strict=True)]
            for name, counts in self.labels.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "labels": self.labels}


def read_label_rates(
    session: Session, window: Any, start: dt.datetime, width: int, bins: int
) -> dict[str, LabelRates]:
    """Per multi-label task, done items and items given each label per bin of `width`
    seconds from `start` (the throughput chart's bins), in one grouped statement.
    `window`: the report's Window (start, end, tasks)."""
    task_sql = "AND w.task = ANY(CAST(:tasks AS text[]))" if window.tasks else ""
    history_sql = "AND h.task = ANY(CAST(:tasks AS text[]))" if window.tasks else ""
    sql = f"""
        WITH fin AS (
            SELECT w.task, w.updated_at AS at, r.output
            FROM work_items w JOIN results r ON r.work_item_id = w.id
            WHERE w.status = 'done' AND w.updated_at >= :start AND w.updated_at <= :end
              AND r.output ->> 'multi_label' = 'true' {task_sql}
            UNION ALL
            SELECT h.task, h.classified_at, h.output
            FROM result_history h
            WHERE h.classified_at >= :start AND h.classified_at <= :end
              AND h.output ->> 'multi_label' = 'true' {history_sql}
        ), binned AS (
            SELECT task, floor(extract(epoch FROM at - CAST(:x0 AS timestamptz)) / :w)::bigint AS k,
                   output -> 'labels' AS labels
            FROM fin
        )
        SELECT task, k, CAST(NULL AS text) AS label, count(*) FROM binned GROUP BY 1, 2
        UNION ALL
        SELECT task, k, CAST(:none AS text), count(*) FROM binned
        WHERE jsonb_typeof(labels) <> 'array' OR jsonb_array_length(labels) = 0 GROUP BY 1, 2
        UNION ALL
        SELECT task, k, lab, count(*) FROM binned,
               jsonb_array_elements_text(CASE WHEN jsonb_typeof(labels) = 'array'
                                              THEN labels ELSE '[]'::jsonb END) AS lab
        GROUP BY 1, 2, 3
    """
    params = {
        "start": window.start,
        "end": window.end,
        "tasks": list(window.tasks),
        "x0": start,
        "w": width,
        "none": NO_LABEL,
    }
    out: dict[str, LabelRates] = {}
    for task, k, label, n in session.execute(text(sql), params):
        got = out.setdefault(task, LabelRates([0] * bins))
        b = min(max(int(k), 0), bins - 1)
        if label is None:
            got.items[b] += n
        else:
            got.labels.setdefault(label, [0] * bins)[b] += n
    for got in out.values():
        got.labels = dict(sorted(got.labels.items(), key=lambda kv: (kv[0] == NO_LABEL, kv[0])))
    return out


def label_rates_html(data: Any) -> str:
    """The report section: one chart per multi-label task, a line per label (the share
    of items given it, per bin); empty when no task in the window gave label sets."""
    if not data.label_rates:
        return ""
    tz = data.generated_at.tzinfo or dt.UTC
    t0 = data.axis[0].timestamp()
    w = data.bin_seconds
    panels = []
    for task, got in data.label_rates.items():
        series = [
            charts.Series(
                name,
                "#BBBBBB" if name == NO_LABEL else charts.colour(i),
                tuple(
                    (t0 + (k + 0.5) * w, 100.0 * r) for k, r in enumerate(rates) if r is not None
                ),
                dashed=name == NO_LABEL,
            )
            for i, (name, rates) in enumerate(got.rates().items())
        ]
        svg = charts.time_series(
            series,
            t0=t0,
            t1=data.axis[1].timestamp(),
            tz=tz,
            y_label="% of items given the label",
            title=f"Labels of {task} over time",
        )
        total = sum(got.items)
        given = ", ".join(
            f"{name} {100 * sum(c) / total:.0f}%" for name, c in got.labels.items() if total
        )
        panels.append(
            f'<figure data-task="{escape(task)}"><figcaption>{escape(task)} '
            f'<span class="muted">\u00b7 {total:,} items; over the window: {escape(given)}'
            f"</span></figcaption>{svg}</figure>"
        )
    return (
        "<section><h2>Labels over time (multi-label tasks)</h2>\n"
        '<p class="note">An item may get several labels, or none: per bin, the share of '
        "the items done that were given each label; the dashed grey line is the share "
        f"given none ({NO_LABEL}).</p>\n" + "".join(panels) + "</section>\n"
    )
