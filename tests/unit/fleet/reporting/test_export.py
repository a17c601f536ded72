"""spreadsheet_safe: which CSV cells a spreadsheet would run as a formula."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.reporting.export import spreadsheet_safe


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("=1+1", "'=1+1"),
        ("+41 22 000", "'+41 22 000"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("c000001", "c000001"),
        ("a=b", "a=b"),
        ("", ""),
        (-0.5, -0.5),
        (3, 3),
        (None, None),
    ],
)
def test_spreadsheet_safe(value, written):
    assert spreadsheet_safe(value) == written


def test_gold_label_lists_and_label_set_scores(tmp_path: Path) -> None:
    """A multi-label gold file gives label lists (possibly empty); stored results are
    read by their output.labels, and a result not done is a missing answer."""
    from fleet.reporting.export import label_set_report, load_gold

    path = tmp_path / "gold.jsonl"
    path.write_text(
        '{"external_id": "a", "labels": ["worried", "hopeful"]}\n'
        '{"external_id": "b", "labels": []}\n'
        '{"external_id": "c", "labels": ["angry"], "source": "app"}\n'
    )
    gold = load_gold(path)
    assert gold.multi_label
    assert gold.any_source == {"a": "hopeful;worried", "b": ""}
    assert gold.per_source == {("app", "c"): "angry"}
    path.write_text('{"external_id": "a", "labels": "worried"}\n')
    with pytest.raises(ValueError, match="gold.jsonl:1: 'labels' must be a list"):
        load_gold(path)
    rows = [
        {
            "status": "done",
            "label": "hopeful;worried",
            "output": {"labels": ["worried", "hopeful"]},
        },
        {"status": "done", "label": None, "output": {"multi_label": True, "labels": []}},
        {"status": "failed", "label": None, "output": None},
    ]
    rep = label_set_report(["hopeful;worried", "", "angry"], rows, ["angry", "hopeful", "worried"])
    assert rep["subset_accuracy"] == pytest.approx(2 / 3) and rep["no_prediction"] == 1
    assert rep["per_label"]["angry"]["recall"] == 0.0 and rep["micro_f1"] == pytest.approx(0.8)
