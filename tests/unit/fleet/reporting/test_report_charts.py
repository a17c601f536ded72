"""The report's pure parts: axis ticks, reason grouping, reading --since/--until."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from fleet.reporting import charts
from fleet.reporting.rundata import reason_key
from fleet.reporting.window import ReportError, parse_when

UTC = dt.UTC


@pytest.mark.parametrize(
    ("vmax", "ticks"),
    [
        (0, [0, 1]),
        (4, [0, 1, 2, 3, 4]),
        (7, [0, 2, 4, 6, 8]),
        (37, [0, 10, 20, 30, 40]),
        (800, [0, 200, 400, 600, 800]),
        (0.3, [0, 0.1, 0.2, 0.3]),
    ],
)
def test_value_ticks_are_round_and_cover_the_maximum(vmax, ticks):
    assert charts.value_ticks(vmax) == pytest.approx(ticks)


def test_count_ticks_are_whole():
    assert charts.value_ticks(1, whole=True) == [0, 1]
    assert charts.value_ticks(3, target=4, whole=True) == [0, 1, 2, 3]


def test_time_ticks_fall_on_round_local_times():
    t0 = dt.datetime(2026, 1, 5, 22, 3, 17, tzinfo=UTC).timestamp()
    ticks = charts.time_ticks(t0, t0 + 3600, UTC)
    assert [label for _, label in ticks] == ["22:10", "22:20", "22:30", "22:40", "22:50", "23:00"]
    overnight = charts.time_ticks(t0, t0 + 4 * 3600, UTC)
    assert overnight[0][1] == "23:00" and "Jan 06 00:00" in [lbl for _, lbl in overnight]
    seconds = charts.time_ticks(t0, t0 + 5, UTC)
    assert [lbl for _, lbl in seconds] == [f"22:03:{s}" for s in range(17, 23)]


def test_charts_are_well_formed_svg_with_their_numbers():
    t0 = dt.datetime(2026, 1, 5, 22, 0, tzinfo=UTC).timestamp()
    line = charts.time_series(
        [charts.Series("intent", charts.colour(0), ((t0 + 30, 120.0), (t0 + 90, 60.0)))],
        t0=t0,
        t1=t0 + 120,
        tz=UTC,
        y_label="items / min",
        title="throughput",
    )
    bars = charts.bar_chart(
        [
            charts.Bar(
                "conversation has no messages",
                (charts.Segment(3, "#EE7733", "failed"), charts.Segment(1, "#CC3311", "dead")),
            ),
            charts.Bar("a <b> & c", (charts.Segment(2, "#EE7733", "failed"),)),
        ],
        title="failures",
        x_label="items",
    )
    for svg in (line, bars):
        ET.fromstring(svg)  # parses: every label is escaped
    assert "intent 22:00:30: 120" in line and ">22:01:00<" in line
    assert "a &lt;b&gt; &amp; c" in bars and ">4</text>" in bars and ">failed<" in bars


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "audio file not found: 'a/one.wav' (looked for /data/audio/a/one.wav)",
            "audio file not found: 'b/two.wav' (looked for /srv/x/b/two.wav)",
        ),
        (
            "speech-01.wav is empty (0 bytes); upload it again",
            "x.flac is empty (0 bytes); upload it again",
        ),
        ("message 3 has no role (expected 'user')", "message 12 has no role (expected 'user')"),
        (
            "lease expired 3 times (worker lost or message lost each time)",
            "lease expired 5 times (worker lost or message lost each time)",
        ),
    ],
)
def test_reasons_that_differ_only_per_item_group_together(a, b):
    assert reason_key(a) == reason_key(b)


def test_reason_keeps_what_tells_reasons_apart():
    assert reason_key("conversation has no messages") == "conversation has no messages"
    assert reason_key("out of memory on the smallest model (smollm2-135m-instruct)") == (
        "out of memory on the smallest model (smollm2-135m-instruct)"
    )
    assert reason_key("first line\ntraceback ...") == "first line"
    assert reason_key(None) == reason_key("  ") == "(no reason recorded)"
    assert reason_key("x" * 500).endswith("\u2026")


def test_parse_when():
    now = dt.datetime(2026, 1, 5, 12, 30, tzinfo=UTC)
    assert parse_when("90m", now=now) == dt.datetime(2026, 1, 5, 11, 0, tzinfo=UTC)
    assert parse_when("7d", now=now) == dt.datetime(2025, 12, 29, 12, 30, tzinfo=UTC)
    assert parse_when("yesterday", now=now) == dt.datetime(2026, 1, 4, tzinfo=UTC)
    assert parse_when("2026-01-05T22:00+01:00", now=now) == dt.datetime(
        2026, 1, 5, 21, 0, tzinfo=UTC
    )
    naive = parse_when("2026-01-05 22:00", now=now)
    assert naive.tzinfo is not None and naive.replace(tzinfo=None) == dt.datetime(2026, 1, 5, 22)
    with pytest.raises(ReportError, match="cannot read --until 'soon'.*24h"):
        parse_when("soon", now=now, option="--until")
