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


def test_every_click_command_function_ends_in_cmd():
    """`run_cmd`, not `run`: a command function never shadows the module or the
    library function it wraps (`fleet.cli.run.run`, `producer.runner.run...`)."""
    import click

    from fleet.cli import main

    def callbacks(cmd: click.Command) -> list[tuple[str, str]]:
        found = [] if cmd is main else [(cmd.name or "", cmd.callback.__name__)]
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                found += callbacks(sub)
        return found

    named = callbacks(main)
    assert len(named) > 30
    assert [pair for pair in named if not pair[1].endswith("_cmd")] == []


# One thing, one home: each of these is defined exactly once in the packages.
ONE_HOME = {
    r"^def _?is_oom\(": "workers/device.py",
    r"^def data_path\(": "config/data/__init__.py",
    r"^STABLE_AFTER_S = ": "fleet/ops/pool.py",
    r"^def visible_gpus\(": "fleet/ops/gpus.py",
    r"environ.get\(\"CUDA_VISIBLE_DEVICES\"": "wire/stats.py",  # gpu_slot: the pinned GPU
    r"^def gpu_free_mb\(": "fleet/ops/gpus.py",
    r"raise SystemExit\(128 \+ signum\)": "fleet/ops/pool.py",
    r"^def unwind_on_sigterm\(": "fleet/ops/pool.py",
    r"^FOOTPRINT_FACTOR = |\* 1\.3\b": "workers/device.py",
    r"^(\w+_)?KEY_PREFIX = ": None,  # gone: wire.keys names each prefix for what it is
    r"^def feed\(": None,  # gone: every driver feeds through producer.drive.Feeder
}


def test_one_home_for_each_thing():
    import re

    packages = ["config", "wire", "db", "producer", "workers", "fleet"]
    sources = {
        p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
        for pkg in packages
        for p in (ROOT / pkg).rglob("*.py")
    }
    for pattern, home in ONE_HOME.items():
        where = sorted(
            path
            for path, text in sources.items()
            for line in text.splitlines()
            if re.search(pattern, line) and not line.lstrip().startswith("#")
        )
        assert where == ([home] if home else []), f"{pattern}: {where}"


def test_fleet_keys_and_queue_names_are_spelled_in_wire_keys():
    """Every `fleet:*` Redis key and `fleet.<task>` queue name is built by wire.keys
    (config.taskconfig's TaskSpec.queue, below wire, is pinned to it in test_keys)."""
    import re

    literal = re.compile(r"""f?["']fleet(:[a-z_]+[:"']|\.\{|\.default|\.control)""")
    # workers/batch.py writes its resume mark inline; it is wire.keys.resume's key.
    allowed = {"wire/keys.py", "config/taskconfig.py", "workers/batch.py"}
    found = sorted(
        p.relative_to(ROOT).as_posix()
        for pkg in ["config", "wire", "db", "producer", "workers", "fleet"]
        for p in (ROOT / pkg).rglob("*.py")
        if literal.search(p.read_text(encoding="utf-8"))
    )
    assert "wire/keys.py" in found
    assert [f for f in found if f not in allowed] == []
