"""fleet.ops.gpus: this host's GPUs from one nvidia-smi query, and `--gpus`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.ops import gpus
from fleet.ops.gpus import parse_gpus


def _nvidia_smi(folder: Path, output: str, code: int = 0) -> None:
    """An `nvidia-smi` on PATH that prints `output` for the fleet's query."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}OUT\nexit {code}\n")
    script.chmod(0o755)


def test_probe_reads_index_and_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _nvidia_smi(tmp_path, "0, 80000\n1, 1234\n2, [N/A]\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpus.probe() == [gpus.Gpu(0, 80000.0), gpus.Gpu(1, 1234.0), gpus.Gpu(2, None)]
    assert gpus.visible_gpus() == 3
    assert gpus.gpu_free_mb() == 1234.0


def test_no_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus.probe() == [] and gpus.visible_gpus() == 0 and gpus.gpu_free_mb() is None


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _nvidia_smi(tmp_path, "NVIDIA-SMI has failed because it couldn't communicate\n", code=9)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpus.probe() == []


@pytest.mark.parametrize(
    ("spec", "available", "expected"),
    [("all", 2, [0, 1]), ("0,3", 0, [0, 3]), (" 1 ", 4, [1])],
)
def test_parse_gpus(spec, available, expected):
    assert parse_gpus(spec, available=available) == expected


@pytest.mark.parametrize("spec", ["all", "0,0", "-1", "x", ""])
def test_parse_gpus_refuses(spec):
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus(spec, available=0)
