from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from fleet.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(main), ids=lambda p: " ".join(p) or "fleet")
def test_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    doc = main if not path else None
    del doc
    # every command explains itself in one line at least
    assert len(result.output.splitlines()) > 3


def test_unknown_task_is_a_config_error(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(main, ["worker", "--task", "nope"])
    assert result.exit_code == 2
    assert "unknown task 'nope'" in result.output and "intent" in result.output


def test_unreachable_database_says_what_to_do(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody:hunter2@127.0.0.1:1/none")
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(main, ["backlog"])
    assert result.exit_code == 3
    assert "cannot reach the database" in result.output
    assert "hunter2" not in result.output
