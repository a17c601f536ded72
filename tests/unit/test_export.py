"""spreadsheet_safe: which CSV cells a spreadsheet would run as a formula."""

from __future__ import annotations

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
