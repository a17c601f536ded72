"""config.data: the one way to the bundled files, and every one of them shipped."""

from __future__ import annotations

import fnmatch
import tomllib

import pytest

from config.data import data_path
from tests.support import REPO

ROOT = REPO


def test_bundled_files_are_found_by_name():
    assert data_path("tasks.toml").is_file()
    assert data_path("eval/intent_eval.jsonl").is_file()
    assert data_path("intent_prototypes.json").parent == data_path("tasks.toml").parent


@pytest.mark.parametrize("name", ["/etc/passwd", "../pyproject.toml", "eval/../../x"])
def test_only_bundled_names(name):
    with pytest.raises(ValueError, match="not a bundled data file"):
        data_path(name)


def test_package_data_ships_every_bundled_file():
    """A non-editable install copies only what [tool.setuptools.package-data] names."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["config.data"]
    folder = data_path("tasks.toml").parent
    files = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"
    ]
    assert files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not unshipped, f"add these to package-data: {unshipped}"
