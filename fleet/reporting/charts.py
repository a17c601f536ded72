"""Charts as inline SVG for the HTML report: a time series and horizontal bars,
each with axes, ticks, gridlines and a colour-blind-safe palette.

Plain string building, no plotting dependency: the markup goes straight into a
self-contained page and stays sharp at any zoom. Sizes are in SVG user units;
the report scales each chart to its column width.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

# Paul Tol's "bright" scheme: distinguishable with the common colour-vision
# deficiencies and legible on white. Tasks take colours in this order.
PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB")
STATUS_COLOURS = {"done": "#228833", "failed": "#EE7733", "dead": "#CC3311"}
INK, MUTED, GRID, AXIS = "#1f2328", "#59636e", "#e6e8eb", "#8c959f"
FONT = 12.0
CHAR_W = 0.6 * FONT  # DejaVu Sans / system sans: a fair average advance per character

TIME_STEPS: tuple[int, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
TIME_STEPS += (7200, 10800, 21600, 43200, 86400, 2 * 86400, 7 * 86400)


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def text_width(s: str, size: float = FONT) -> float:
    return len(s) * 0.6 * size


def clip(s: str, max_width: float, size: float = FONT) -> str:
    """Shorten `s` with an ellipsis so it fits `max_width` units."""
    room = max(int(max_width / (0.6 * size)), 2)
    return s if len(s) <= room else s[: room - 1].rstrip() + "\u2026"


def nice_step(span: float, target: int) -> float:
    """A 1, 2 or 5 x 10^k step giving about `target` intervals over `span`."""
    if span <= 0:
        return 1.0
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def value_ticks(vmax: float, target: int = 5, *, whole: bool = False) -> list[float]:
    """Ticks from 0 up to the first tick at or above `vmax` (at least one interval);
    `whole` keeps steps of counts at 1 or more."""
    if vmax <= 0:
        return [0.0, 1.0]
    step = nice_step(vmax, target)
    if whole:
        step = max(step, 1.0)
    n = math.ceil(vmax / step - 1e-9)
    return [i * step for i in range(n + 1)]


def fmt_number(v: float) -> str:
    if v == int(v):
        return f"{int(v):,}"
    if abs(v) >= 10:
        return f"{v:,.0f}"
    return f"{v:.2g}" if abs(v) < 1 else f"{v:.1f}"


def time_step(span_s: float, target: int = 7) -> int:
    """The first round time step (1 s ... 7 d) giving at most `target` ticks."""
    for step in TIME_STEPS:
        if span_s / step <= target:
            return step
    return TIME_STEPS[-1]


def time_ticks(t0: float, t1: float, tz: dt.tzinfo, target: int = 7) -> list[tuple[float, str]]:
    """Round local-time ticks inside [t0, t1] (epoch seconds) with their labels."""
    step = time_step(t1 - t0, target)
    start = dt.datetime.fromtimestamp(t0, tz)
    # Align to the step in local time (a 15 min step ticks at :00, :15, ...).
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    offset = (start - midnight).total_seconds()
    first = midnight.timestamp() + math.ceil(offset / step - 1e-9) * step
    ticks: list[tuple[float, str]] = []
    t = first
    last_day = None
    while t <= t1 + 1e-6:
        when = dt.datetime.fromtimestamp(t, tz)
        label = when.strftime("%H:%M:%S" if step < 60 else "%H:%M")
        if step >= 86400:
            label = when.strftime("%b %d")
        elif last_day is not None and when.date() != last_day:
            label = when.strftime("%b %d ") + label
        last_day = when.date()
        ticks.append((t, label))
        t += step
    return ticks


def _svg(width: float, height: float, label: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="100%" role="img" aria-label="{escape(label)}" '
        f'font-family="DejaVu Sans, system-ui, sans-serif" font-size="{FONT:.0f}">'
        f"<title>{escape(label)}</title>" + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, s: str, *, anchor: str = "start", fill: str = INK, **kw: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in kw.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}"{extra}>'
        f"{escape(s)}</text>"
    )


def _legend(items: Sequence[tuple[str, str]], x_right: float, y: float) -> list[str]:
    """Swatches and names right-aligned at `x_right`, in one text element so the
    browser spaces them by the real glyph widths."""
    parts = []
    for i, (name, fill) in enumerate(items):
        gap = ' dx="18"' if i else ""
        parts.append(
            f'<tspan{gap} fill="{fill}" font-size="15">\u25a0</tspan>'
            f'<tspan dx="5" fill="{MUTED}">{escape(name)}</tspan>'
        )
    return [f'<text x="{x_right:.1f}" y="{y + 4:.1f}" text-anchor="end">{"".join(parts)}</text>']


@dataclass(frozen=True)
class Series:
    """One line of a time series: (epoch seconds, value) points in time order."""

    name: str
    colour: str
    points: tuple[tuple[float, float], ...]
    dashed: bool = False


def time_series(
    series: Sequence[Series],
    *,
    t0: float,
    t1: float,
    tz: dt.tzinfo,
    y_label: str,
    title: str,
    width: float = 1100,
    height: float = 320,
) -> str:
    """Lines over a time axis with a zero-based y axis, gridlines and a legend."""
    left, right, top, bottom = 64.0, 16.0, 34.0, 42.0
    pw, ph = width - left - right, height - top - bottom
    vmax = max((v for s in series for _, v in s.points), default=0.0)
    yt = value_ticks(vmax)
    ymax = yt[-1]
    span = max(t1 - t0, 1e-9)

    def px(t: float) -> float:
        return left + (t - t0) / span * pw

    def py(v: float) -> float:
        return top + ph - v / ymax * ph

    body: list[str] = []
    for v in yt:
        y = py(v)
        body.append(
            f'<line x1="{left:.1f}" x2="{left + pw:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID if v else AXIS}"/>'
        )
        body.append(_text(left - 8, y + 4, fmt_number(v), anchor="end", fill=MUTED))
    for t, label in time_ticks(t0, t1, tz):
        x = px(t)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{top + ph:.1f}" stroke="{GRID}"/>'
        )
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph:.1f}" y2="{top + ph + 5:.1f}" '
            f'stroke="{AXIS}"/>'
        )
        body.append(_text(x, top + ph + 19, label, anchor="middle", fill=MUTED))
    body.append(
        f'<line x1="{left:.1f}" x2="{left:.1f}" y1="{top:.1f}" y2="{top + ph:.1f}" stroke="{AXIS}"/>'
    )
    cy = top + ph / 2
    body.append(
        _text(14, cy, y_label, anchor="middle", fill=MUTED, transform=f"rotate(-90 14 {cy:.1f})")
    )
    for s in series:
        if not s.points:
            continue
        pts = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in s.points)
        if len(series) == 1:  # a light area under a lone line reads as volume
            first, last = px(s.points[0][0]), px(s.points[-1][0])
            body.append(
                f'<polygon points="{first:.1f},{py(0):.1f} {pts} {last:.1f},{py(0):.1f}" '
                f'fill="{s.colour}" fill-opacity="0.12"/>'
            )
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        body.append(
            f'<polyline points="{pts}" fill="none" stroke="{s.colour}" stroke-width="2.2" '
            f'stroke-linejoin="round"{dash}><title>{escape(s.name)}</title></polyline>'
        )
        if len(s.points) <= 90 and not s.dashed:
            for t, v in s.points:
                when = dt.datetime.fromtimestamp(t, tz).strftime("%H:%M:%S")
                body.append(
                    f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="2.6" fill="{s.colour}">'
                    f"<title>{escape(s.name)} {when}: {fmt_number(round(v, 1))}</title></circle>"
                )
    body += _legend([(s.name, s.colour) for s in series], width - right, 14)
    return _svg(width, height, title, body)


@dataclass(frozen=True)
class Segment:
    value: float
    colour: str
    name: str


@dataclass(frozen=True)
class Bar:
    """One horizontal bar: stacked segments, a label and a hover text."""

    label: str
    segments: tuple[Segment, ...]
    note: str = ""  # written after the bar's total, e.g. a share
    hover: str = ""
    tag: str = ""  # written bold before the label, in tag_colour (e.g. the task)
    tag_colour: str = INK

    @property
    def total(self) -> float:
        return sum(s.value for s in self.segments)


def bar_chart(
    bars: Sequence[Bar],
    *,
    title: str,
    x_label: str,
    width: float = 540,
    value_fmt: Callable[[float], str] = fmt_number,
    label_width: float | None = None,
) -> str:
    """Horizontal bars, largest first as given. Short labels sit left of their bar;
    long ones (failure reasons) get a line of their own above it."""
    longest = max((text_width(b.label) for b in bars), default=0.0)
    stacked = label_width is None and longest > min(0.42 * width, 260)
    lw = 0.0 if stacked else (label_width or min(longest + 12, 0.42 * width))
    names = list(dict.fromkeys(s.name for b in bars for s in b.segments if s.value > 0))
    legend = len(names) > 1
    top = 30.0 if legend else 8.0
    row = 40.0 if stacked else 26.0
    bar_h = 15.0
    left = 8.0 + lw
    max_note = max((text_width(f"{value_fmt(b.total)} {b.note}".strip()) for b in bars), default=0)
    pw = max(width - left - max_note - 18, 60.0)
    ph = row * len(bars)
    height = top + ph + 44
    ticks = value_ticks(max((b.total for b in bars), default=0.0), target=4, whole=True)
    vmax = ticks[-1]

    def px(v: float) -> float:
        return left + v / vmax * pw

    body: list[str] = []
    for v in ticks:
        x = px(v)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{top + ph:.1f}" '
            f'stroke="{AXIS if v == 0 else GRID}"/>'
        )
        body.append(_text(x, top + ph + 17, fmt_number(v), anchor="middle", fill=MUTED))
    body.append(
        f'<line x1="{left:.1f}" x2="{left + pw:.1f}" y1="{top + ph:.1f}" y2="{top + ph:.1f}" '
        f'stroke="{AXIS}"/>'
    )
    body.append(_text(left + pw / 2, top + ph + 36, x_label, anchor="middle", fill=MUTED))
    for i, b in enumerate(bars):
        y0 = top + i * row
        by = y0 + (row - bar_h) / 2 + (8 if stacked else 0)
        if stacked and b.tag:
            room = width - left - 8 - text_width(b.tag + ": ")
            body.append(
                f'<text x="{left:.1f}" y="{y0 + 13:.1f}" fill="{INK}">'
                f'<tspan font-weight="bold" fill="{b.tag_colour}">{escape(b.tag)}:</tspan> '
                f"{escape(clip(b.label, room))}</text>"
            )
        elif stacked:
            body.append(_text(left, y0 + 13, clip(b.label, width - left - 8)))
        else:
            body.append(_text(left - 8, by + bar_h - 3, clip(b.label, lw - 12), anchor="end"))
        x = left
        hover = escape(b.hover or f"{b.label}: {value_fmt(b.total)}")
        for seg in b.segments:
            w = seg.value / vmax * pw
            if w > 0:
                body.append(
                    f'<rect x="{x:.1f}" y="{by:.1f}" width="{max(w, 1.5):.1f}" '
                    f'height="{bar_h:.0f}" fill="{seg.colour}"><title>{hover}</title></rect>'
                )
            x += w
        note = f"{value_fmt(b.total)} {b.note}".strip()
        body.append(_text(x + 6, by + bar_h - 3, note, fill=MUTED))
    if legend:
        fills = {s.name: s.colour for b in bars for s in b.segments}
        body += _legend([(n, fills[n]) for n in names], width - 4, 12)
    return _svg(width, height, title, body)


def reliability_diagram(bins: Sequence[dict[str, float]], *, title: str, ece: float) -> str:
    """A reliability diagram (Guo et al. 2017, fig. 1): per equal-width confidence bin, a
    bar as high as the share correct, over the diagonal a calibrated model would follow.

    `bins`: `fleet.reporting.scoring.reliability_bins` output (lo, hi, n, confidence,
    accuracy). Empty bins draw no bar; each bar's hover gives its counts.
    """
    width, height = 360.0, 300.0
    left, right, top, bottom = 48.0, 16.0, 30.0, 46.0
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + v * pw

    def py(v: float) -> float:
        return top + (1 - v) * ph

    body = [_text(left, 18, f"{title} \u00b7 ECE {ece:.3f}", font_weight="700")]
    for k in range(6):
        v = k / 5
        body.append(
            f'<line x1="{px(0):.1f}" x2="{px(1):.1f}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
            f'stroke="{GRID}"/>'
        )
        body.append(_text(left - 6, py(v) + 4, f"{v:.1f}", anchor="end", fill=MUTED))
        body.append(_text(px(v), top + ph + 16, f"{v:.1f}", anchor="middle", fill=MUTED))
    for b in bins:
        if not b["n"]:
            continue
        x0, x1 = px(b["lo"]) + 1, px(b["hi"]) - 1
        body.append(
            f'<rect x="{x0:.1f}" y="{py(b["accuracy"]):.1f}" width="{x1 - x0:.1f}" '
            f'height="{py(0) - py(b["accuracy"]):.1f}" fill="{PALETTE[0]}" fill-opacity="0.8">'
            f"<title>confidence {b['lo']:.1f}-{b['hi']:.1f}: {int(b['n'])} items, "
            f"mean confidence {b['confidence']:.3f}, accuracy {b['accuracy']:.3f}</title></rect>"
        )
    body.append(
        f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(1):.1f}" y2="{py(1):.1f}" '
        f'stroke="{PALETTE[1]}" stroke-dasharray="5 4" stroke-width="1.5"/>'
    )
    body.append(
        f'<line x1="{px(0):.1f}" x2="{px(1):.1f}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="{AXIS}"/>'
    )
    body.append(_text(left + pw / 2, height - 8, "confidence", anchor="middle", fill=MUTED))
    body.append(
        _text(
            14,
            top + ph / 2,
            "accuracy",
            anchor="middle",
            fill=MUTED,
            transform=f"rotate(-90 14 {top + ph / 2:.1f})",
        )
    )
    return _svg(width, height, f"{title}: reliability diagram", body)
