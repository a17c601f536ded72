"""`fleet report`: one self-contained HTML page about a run or a time window.

It shows items finished per minute per task, the labels each task gave, which
model tier served how many items, why items failed (grouped by reason) and a
summary table; fleet/reporting/rundata.py reads the numbers from the ledger.

The page references nothing outside itself: charts are inline SVG
(fleet/reporting/charts.py), styles are inline, and the numbers behind the charts are
embedded as JSON (`<script type="application/json" id="report-data">`) for
scripts.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from pathlib import Path
from typing import Any

from fleet.observe.cascade import cascade_table
from fleet.reporting import charts
from fleet.reporting.charts import STATUS_COLOURS, Bar, Segment, Series
from fleet.reporting.labelsets import label_rates_html
from fleet.reporting.review import agreement_table
from fleet.reporting.rundata import IDLE_GAP_SECONDS, ReportData, TaskRow, read_report
from fleet.reporting.window import ReportError, fmt_when

__all__ = ["ReportError", "fmt_duration", "render", "write_report"]

TOP_LABELS = 10
MAX_REASONS = 15


def fmt_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m:02d} m"
    return f"{m} m {s:02d} s" if m else f"{s} s"


def _rate(v: float | None) -> str:
    if v is None:
        return "\u2014"
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def _task_colours(data: ReportData) -> dict[str, str]:
    return {r.task: charts.colour(i) for i, r in enumerate(data.rows)}


def _throughput_svg(data: ReportData) -> str:
    tz = data.generated_at.tzinfo or dt.UTC
    t0 = data.axis[0].timestamp()
    w = data.bin_seconds
    per_min = 60.0 / w
    colours = _task_colours(data)
    series = [
        Series(
            task,
            colours[task],
            tuple((t0 + (k + 0.5) * w, n * per_min) for k, n in enumerate(counts)),
        )
        for task, counts in data.throughput.items()
    ]
    if len(series) > 1:
        totals = [sum(c) for c in zip(*data.throughput.values(), strict=True)]
        series.append(
            Series(
                "all tasks",
                "#57606a",
                tuple((t0 + (k + 0.5) * w, n * per_min) for k, n in enumerate(totals)),
                dashed=True,
            )
        )
    return charts.time_series(
        series,
        t0=t0,
        t1=data.axis[1].timestamp(),
        tz=tz,
        y_label="items finished / min",
        title="Items finished per minute, per task",
    )


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}%" if total else ""


def _label_panels(data: ReportData) -> tuple[list[str], list[str]]:
    colours = _task_colours(data)
    panels, unlabelled = [], []
    for r in data.rows:
        counts = data.labels.get(r.task, [])
        labelled = [(lbl, n) for lbl, n in counts if lbl is not None]
        total = sum(n for _, n in counts)
        if not labelled:
            if r.done:
                unlabelled.append(r.task)
            continue
        shown = counts[:TOP_LABELS]
        rest = counts[TOP_LABELS:]
        bars = [
            Bar(
                lbl if lbl is not None else "(no label)",
                (Segment(n, colours[r.task], "items"),),
                note=f"({_pct(n, total)})",
                hover=f"{r.task}: {lbl}: {n} of {total} items ({_pct(n, total)})",
            )
            for lbl, n in shown
        ]
        if rest:
            n_rest = sum(n for _, n in rest)
            bars.append(
                Bar(
                    f"other ({len(rest)} labels)",
                    (Segment(n_rest, "#BBBBBB", "items"),),
                    note=f"({_pct(n_rest, total)})",
                )
            )
        svg = charts.bar_chart(bars, title=f"Labels of {r.task}", x_label="items (done)")
        panels.append(
            f'<figure data-task="{escape(r.task)}"><figcaption>'
            f'<span class="swatch" style="background:{colours[r.task]}"></span>'
            f'{escape(r.task)} <span class="muted">\u00b7 {total:,} items, '
            f"{len(counts)} labels</span></figcaption>{svg}</figure>"
        )
    return panels, unlabelled


def _tier_svg(data: ReportData) -> str:
    bars = [
        Bar(
            f"{t.task} \u00b7 tier {t.tier} \u00b7 {t.model}",
            (
                Segment(t.done, STATUS_COLOURS["done"], "done"),
                Segment(t.failed, STATUS_COLOURS["failed"], "failed (result kept)"),
            ),
            hover=f"{t.task}, tier {t.tier} ({t.model}): {t.done} done, {t.failed} failed",
        )
        for t in data.tiers
    ]
    return charts.bar_chart(
        bars,
        title="Items served per model tier",
        x_label="items with a result from this tier",
        width=1100,
        label_width=min(max(charts.text_width(b.label) for b in bars) + 16, 460),
    )


def _failure_svg(data: ReportData) -> str:
    many_tasks = len({f.task for f in data.failures}) > 1
    shown = data.failures[:MAX_REASONS]
    colours = _task_colours(data)
    bars = [
        Bar(
            f.reason,
            (
                Segment(f.failed, STATUS_COLOURS["failed"], "failed"),
                Segment(f.dead, STATUS_COLOURS["dead"], "dead"),
            ),
            hover=f"{f.task}: {f.failed} failed, {f.dead} dead. For example: {f.example}",
            tag=f.task if many_tasks else "",
            tag_colour=colours.get(f.task, charts.INK),
        )
        for f in shown
    ]
    rest = data.failures[MAX_REASONS:]
    if rest:
        bars.append(
            Bar(
                f"{len(rest)} other reasons",
                (
                    Segment(sum(f.failed for f in rest), STATUS_COLOURS["failed"], "failed"),
                    Segment(sum(f.dead for f in rest), STATUS_COLOURS["dead"], "dead"),
                ),
            )
        )
    return charts.bar_chart(
        bars, title="Failed and dead items by reason", x_label="items", width=1100
    )


def _summary_table(data: ReportData) -> str:
    dur = data.duration_s
    head = (
        "<tr><th>task</th><th>items</th><th>done</th><th>failed</th><th>dead</th>"
        "<th>done %</th><th>items/s</th><th>latency p50</th><th>first finish</th>"
        "<th>last finish</th></tr>"
    )
    colours = _task_colours(data)

    w = data.window
    same_day = w.start.astimezone().date() == w.end.astimezone().date()
    clock = "%H:%M:%S" if same_day else "%m-%d %H:%M:%S"

    def line(r: TaskRow, cls: str, swatch: str) -> str:
        p50 = f"{r.latency_p50_ms:,.0f} ms" if r.latency_p50_ms is not None else "\u2014"
        first = r.first.astimezone().strftime(clock) if r.first else "\u2014"
        last = r.last.astimezone().strftime(clock) if r.last else "\u2014"
        return (
            f'<tr class="{cls}" data-task="{escape(r.task)}"><td>{swatch}{escape(r.task)}</td>'
            f'<td data-k="items">{r.items:,}</td><td data-k="done">{r.done:,}</td>'
            f'<td data-k="failed">{r.failed:,}</td><td data-k="dead">{r.dead:,}</td>'
            f"<td>{_pct(r.done, r.items)}</td>"
            f'<td data-k="items_per_s">{_rate(r.items / dur if dur > 0 else None)}</td>'
            f"<td>{p50}</td><td>{first}</td><td>{last}</td></tr>"
        )

    body = [
        line(r, "", f'<span class="swatch" style="background:{colours[r.task]}"></span>')
        for r in data.rows
    ]
    if len(data.rows) > 1:
        body.append(line(data.total, "total", ""))
    return f'<table class="summary">{head}{"".join(body)}</table>'


def _cards(data: ReportData) -> str:
    t = data.total
    cards = [
        ("items", f"{t.items:,}"),
        ("done", f"{t.done:,}"),
        ("failed", f"{t.failed:,}"),
        ("dead", f"{t.dead:,}"),
        ("duration", fmt_duration(data.duration_s)),
        ("items/s", _rate(data.items_per_s)),
    ]
    return "".join(
        f'<div class="card{" bad" if k in ("failed", "dead") and v != "0" else ""}" '
        f'data-k="{k}"><div class="k">{k}</div><div class="v">{v}</div></div>'
        for k, v in cards
    )


def _facts(data: ReportData) -> str:
    w = data.window
    tz = data.generated_at.strftime("UTC%z")
    tz = tz[:-2] + ":" + tz[-2:] if len(tz) > 5 else tz
    end_note = ""
    if w.open_run:
        end_note = " (no finish recorded: still running, or stopped before it finished)"
    elif w.timed_out:
        end_note = " (timed out with work unfinished)"
    facts = [
        ("run", f"{w.run_id}" if w.run_id is not None else "\u2014"),
        ("trigger", data.trigger_text),
        ("window", f"{fmt_when(w.start)} \u2192 {fmt_when(w.end)} {tz}{end_note}"),
        ("tasks", ", ".join(r.task for r in data.rows)),
    ]
    if w.run_id is None:
        facts.append(
            (
                "duration",
                "busy time: first to last finish in the window, less pauses of over "
                f"{IDLE_GAP_SECONDS / 60:g} minutes with nothing finished",
            )
        )
    return "".join(f'<tr data-k="{k}"><th>{k}</th><td>{escape(v)}</td></tr>' for k, v in facts)


def _cascades_html(data: ReportData) -> str:
    """The cascades section (nothing when no task escalated anything)."""
    if not data.cascades:
        return ""
    return (
        '<section><h2>Cascades</h2>\n<p class="note">Items each cheap task sent to its stronger '
        "task (under <code>escalate_below</code>) and what the stronger tier cost in model time "
        "(all time, not only this window).</p>\n" + cascade_table(data.cascades) + "</section>\n"
    )


def _json_data(data: ReportData) -> str:
    w = data.window
    payload = {
        "run_id": w.run_id,
        "trigger": data.trigger_text,
        "window": {"start": w.start.isoformat(), "end": w.end.isoformat()},
        "cascades": {t: c.to_json() for t, c in data.cascades.items()},
        "calibration": {
            t: {k: rep[k] for k in ("n", "accuracy", "ece", "reliability", "uncalibrated")}
            for t, rep in data.calibration.items()
        },
        "tasks": {
            r.task: {
                "items": r.items,
                "done": r.done,
                "failed": r.failed,
                "dead": r.dead,
                "latency_p50_ms": r.latency_p50_ms,
            }
            for r in data.rows
        },
        "duration_s": data.duration_s,
        "items_per_s": data.items_per_s,
        "throughput": {
            "start": data.axis[0].isoformat(),
            "bin_seconds": data.bin_seconds,
            "counts": data.throughput,
        },
        "labels": {t: {str(lbl): n for lbl, n in c} for t, c in data.labels.items()},
        "label_rates": {t: r.to_json() for t, r in data.label_rates.items()},
        "tiers": [t.__dict__ for t in data.tiers],
        "failures": [f.__dict__ for f in data.failures],
        "runs": [r.id for r in data.runs],
        "review": data.review,
    }
    # "</" cannot end the script element early; JSON reads "<\/" as "</".
    return json.dumps(payload, default=str).replace("</", "<\\/")


CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d8dee4; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; background:#fff; color:var(--ink);
  font: 14px/1.45 "DejaVu Sans", system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 1164px; margin: 0 auto; padding: 26px 32px 36px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 0 0 2px; }
.muted, .note { color: var(--muted); }
.note { margin: 0 0 10px; font-size: 13px; }
section { margin-top: 28px; }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 12px; margin: 18px 0 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--bg); }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.card .v { font-size: 24px; font-weight: 700; font-variant-numeric: tabular-nums; }
.card.bad[data-k=failed] .v { color: #b35a00; } .card.bad[data-k=dead] .v { color: #a3280c; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.facts { width: auto; margin-bottom: 6px; }
table.facts th { text-align: left; color: var(--muted); font-weight: 400; padding: 2px 18px 2px 0; }
table.facts td { padding: 2px 0; }
table.summary th, table.summary td { padding: 7px 10px; border-bottom: 1px solid var(--line);
  text-align: right; white-space: nowrap; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary th { color: var(--muted); font-size: 12px; font-weight: 600;
  text-transform: uppercase; letter-spacing: .04em; }
table.summary tr.total td { font-weight: 700; border-top: 2px solid var(--ink); }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px 32px; }
figure { margin: 0; }
figcaption { font-weight: 700; margin-bottom: 2px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 7px; }
svg { display: block; }
footer { margin-top: 30px; color: var(--muted); font-size: 12px; }
"""


def _sources_html(data: ReportData) -> str:
    """The synced sources: lag, failures, and the rows the sync could not take as they are."""
    if not data.sources:
        return ""
    rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        f"<td>{'never' if s.lag_seconds is None else fmt_duration(s.lag_seconds) + ' ago'}</td>"
        f"<td>{s.refused:,}</td><td>{s.noted:,}</td><td>{s.withheld:,}</td>"
        f"<td>{s.undiscovered:,}</td><td>{escape(s.last_error or '')}</td></tr>"
        for name, s in data.sources.items()
    )
    problems = "".join(
        f"<tr><td>{escape(p['source'])}</td><td>{escape(p['external_id'] or '(no id)')}</td>"
        f"<td>{'refused' if p['refused'] else 'note'}</td><td>{escape(p['reason'])}</td>"
        f"<td>{escape(fmt_when(p['first_seen']))}</td></tr>"
        for p in data.problems
    )
    listed = (
        "<table><tr><th>source</th><th>external_id</th><th></th><th>reason</th>"
        f"<th>first seen</th></tr>{problems}</table>"
        if problems
        else '<p class="note">Every row read as it is.</p>'
    )
    return f"""<section><h2>Sources</h2>
<p class="note">Each synced source: when it last synced, rows refused or taken with a note
(sync_problems: the newest {len(data.problems)} below), deletes withheld by the mass-delete
guard, rows not yet discovered by a run, and why its last pass failed.</p>
<table><tr><th>source</th><th>last sync</th><th>refused</th><th>with a note</th>
<th>deletes withheld</th><th>not discovered</th><th>last error</th></tr>{rows}</table>
{listed}</section>
"""


def render(data: ReportData) -> str:
    """The page as one HTML string."""
    w = data.window
    if w.run_id is not None:
        title = f"Fleet report: run {w.run_id} ({w.trigger})"
    else:
        title = f"Fleet report: {fmt_when(w.start)} to {fmt_when(w.end)}"
    panels, unlabelled = _label_panels(data)
    labels_html = f'<div class="grid">{"".join(panels)}</div>' if panels else ""
    if unlabelled:
        labels_html += (
            f'<p class="note">{escape(", ".join(unlabelled))}: results carry no label '
            "(e.g. transcripts; their follow-up task labels them).</p>"
        )
    tiers_html = (
        _tier_svg(data)
        if data.tiers
        else '<p class="note">No results with a model tier in this window.</p>'
    )
    fail_html = (
        _failure_svg(data)
        if data.failures
        else '<p class="note">No failed or dead items in this window.</p>'
    )
    bs = data.bin_seconds
    bin_note = f"{bs} s" if bs < 60 else f"{bs // 60} min" if bs < 3600 else f"{bs / 3600:g} h"
    if bs >= 86400:
        bin_note = f"{bs / 86400:g} d"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<table class="facts">{_facts(data)}</table>
<div class="cards">{_cards(data)}</div>
<section><h2>Summary</h2>
<p class="note">Items that reached done, failed or dead in the window; items/s over the
duration above.</p>
{_summary_table(data)}</section>
<section><h2>Throughput</h2>
<p class="note">Items finished (done, failed or dead) per minute, counted in {bin_note} bins.</p>
{_throughput_svg(data)}</section>
<section><h2>Labels</h2>
<p class="note">What each task said about the items it finished (top {TOP_LABELS}).</p>
{labels_html}</section>
{label_rates_html(data)}<section><h2>Calibration</h2>
<p class="note">Reliability diagrams: stored results with a gold label, in 10 confidence bins;
a bar's height is the share right, the dashed diagonal where a calibrated model's bars end.
ECE: the bins' gaps weighted by their items.</p>
{_calibration_html(data)}</section>
<section><h2>Model tiers</h2>
<p class="note">Which tier of each task's ladder made the results (tier 0 is the largest
model; a worker steps down on out-of-memory).</p>
{tiers_html}</section>
<section><h2>Failures</h2>
<p class="note">Failed and dead items grouped by reason (values that differ per item, such as
file names and numbers, are folded; hover a bar for an example).</p>
{fail_html}</section>
<section><h2>Reviews</h2>
<p class="note">How often reviewers gave the label the model had given, per reviewer's label
(every confirmed label of these tasks, not only this window's).</p>
{agreement_table(data.review)}</section>
{_cascades_html(data)}{_sources_html(data)}<footer>Generated by <code>fleet report</code> at {fmt_when(data.generated_at)} from database
{escape(data.database)}.</footer>
</main>
<script type="application/json" id="report-data">{_json_data(data)}</script>
</body></html>
"""


def _calibration_html(data: ReportData) -> str:
    if not data.calibration:
        return (
            '<p class="note">No gold labels given: pass <code>--gold TASK=FILE</code> '
            "(the <code>fleet eval</code> format) to draw a reliability diagram per task.</p>"
        )
    panels = []
    for task, rep in data.calibration.items():
        svg = charts.reliability_diagram(rep["reliability"], title=task, ece=rep["ece"])
        note = f"{rep['n']:,} gold items, accuracy {rep['accuracy']:.3f}"
        if rep.get("uncalibrated"):
            note += f", {rep['uncalibrated']:,} from a model without calibration.json"
        panels.append(
            f'<figure data-task="{escape(task)}"><figcaption>{escape(task)} '
            f'<span class="muted">\u00b7 {escape(note)}</span></figcaption>{svg}</figure>'
        )
    return f'<div class="grid">{"".join(panels)}</div>'


def write_report(
    url: str, out: Path, *, gold: dict[str, Path] | None = None, **options: Any
) -> ReportData:
    """Read the window's data, score `gold` ({task: gold file}) for the reliability
    diagrams, and write the page to `out`. Raises ReportError (no such window) and
    ValueError (a bad gold file)."""
    from fleet.reporting.export import evaluate, load_gold

    data = read_report(url, **options)
    for task, path in (gold or {}).items():
        data.calibration[task] = evaluate(url, task=task, gold=load_gold(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return data
