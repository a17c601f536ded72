"""Model folders other users can read, as the umask allows (fleet.models.folders)."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.models.folders import current_umask, make_readable


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize(
    ("umask", "folder", "file"),
    [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)],
)
def test_modes_follow_the_umask(tmp_path, umask, folder, file):
    """A mkdtemp folder (0700) holding weights as safetensors writes them (0600)."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(tempfile.mkdtemp(dir=tmp_path))
    (out / "sub").mkdir(mode=0o700)
    save_file({"w": np.zeros(2, dtype=np.float32)}, out / "model.safetensors")
    (out / "sub" / "tokenizer.json").write_text("{}")
    (out / "sub" / "tokenizer.json").chmod(0o600)
    assert mode(out) == 0o700 and mode(out / "model.safetensors") == 0o600
    make_readable(out, umask=umask)
    assert mode(out) == folder and mode(out / "sub") == folder
    assert mode(out / "model.safetensors") == file
    assert mode(out / "sub" / "tokenizer.json") == file


def test_current_umask_is_read_back_unchanged(umask_022):
    assert current_umask() == 0o022
    assert current_umask() == 0o022


@pytest.mark.slow
def test_prepared_smollm_folder_is_readable_by_others(tmp_path, umask_022):
    from fleet.models.convert.smollm import prepare_smollm

    folder = prepare_smollm(tmp_path / "models")
    assert mode(folder) == 0o755
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}
