"""The codebase's own rules: the import layering and the typed modules.

The contracts live in pyproject.toml ([tool.importlinter], [tool.mypy]);
these tests run the same tools `.ci/run` runs, so a plain `pytest` catches a
layer broken by a lazy import or a strict module that lost its types.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_layers_hold():
    got = _run(str(BIN / "lint-imports"), "--no-cache")
    assert got.returncode == 0, got.stdout[-6000:] + got.stderr[-2000:]
    assert "0 broken" in got.stdout


@pytest.mark.slow
def test_mypy_is_clean_with_strict_modules():
    got = _run(sys.executable, "-m", "mypy")
    assert got.returncode == 0, got.stdout[-6000:] + got.stderr[-2000:]
