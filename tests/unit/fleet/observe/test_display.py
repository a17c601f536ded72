"""What people read at 80 columns: names, labels and ids whole (never
`professio/nal`), ids in natural order with their source; and the pure sort key."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fleet.observe import display


@pytest.mark.parametrize(
    ("values", "ordered"),
    [
        (["c10", "c2", "c1"], ["c1", "c2", "c10"]),
        (["10", "9", "100"], ["9", "10", "100"]),
        (["b1", "a10", "a9"], ["a9", "a10", "b1"]),
        (["x-2-10", "x-2-9", "x-10-1"], ["x-2-9", "x-2-10", "x-10-1"]),
        (["B", "a", "2"], ["2", "a", "B"]),
    ],
)
def test_natural_key(values, ordered):
    assert sorted(values, key=display.natural_key) == ordered


@pytest.fixture
def screen(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(display, "out", Console(file=buf, width=80, color_system=None))
    return buf


def test_results_at_80_columns_keep_labels_whole_and_sort_ids_naturally(screen):
    rows = [
        {
            "external_id": f"conv-{i}",
            "source": "app" if i % 2 else "ingest",
            "status": "done" if i % 3 else "failed",
            "label": ("professional", "psychological", "aspirational")[i % 3],
            "confidence": 0.5,
            "model_name": "minilm-intent",
            "model_tier": 0,
            "error": None if i % 3 else "message 3 has no role (expected a string such as 'user')",
        }
        for i in (10, 2, 1, 11, 3)
    ]
    display.results_table(rows, title="intent: all")
    text = screen.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("professional", "psychological", "aspirational", "minilm-intent", "source"):
        assert word in text, text
    ids = [w for line in text.splitlines() for w in line.split() if w.startswith("conv-")]
    assert ids == ["conv-1", "conv-3", "conv-11", "conv-2", "conv-10"]  # app, then ingest


def test_counts_at_80_columns_keep_task_and_status_names_whole(screen):
    display.counts_table(
        {
            "audio_intent": {"done": 12, "failed": 1},
            "llm_classify": {"pending": 3, "running": 2, "done": 1000},
            "transcribe": {"parked": 1, "dead": 2},
        }
    )
    text = screen.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("audio_intent", "llm_classify", "transcribe", "pending", "running", "parked"):
        assert word in text, text
    assert "queued" not in text and "gone" not in text  # no column of zeros
