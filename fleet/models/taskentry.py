"""The task-config entry `fleet train` prints (or appends with --write-config)
for the folder it trained: a new task's whole entry, or the ladder tier of an
existing task; and where a trained folder goes by default.

Pure text in, text out, except `append_entry`, which writes the user's
FLEET_CONFIG_FILE only after the result parses as a task config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from config.taskconfig import ConfigError, TaskSpec, TierSpec, load_tasks, read_document


def default_out(state_dir: Path, name: str) -> Path:
    """Where a trained folder goes without --out: `<state folder>/trained/<name>`
    (FLEET_MODELS_DIR is read-only in the compose and Kubernetes deployments)."""
    return state_dir / "trained" / name


def new_task(name: str, kind: str, out: Path) -> TaskSpec:
    """A task the config does not have yet, over conversations, whose one ladder
    tier is the folder about to be trained; its labels come from the data."""
    return TaskSpec(
        name=name,
        kind=kind,
        source="conversation",
        ladder=(TierSpec(name=out.name, path=str(out)),),
    )


def task_entry(name: str, kind: str, labels: Sequence[str], tier_lines: str) -> str:
    """A new task's whole TOML entry: kind, source, its labels and the trained tier.

    `tier_lines`: the `[[tasks.<name>.ladder]]` lines (fleet.models.finetune.tier_toml)."""
    lines = [
        f"[tasks.{name}]",
        f"kind = {json.dumps(kind)}",
        'source = "conversation"',
        f"description = {json.dumps(f'{name}: trained by `fleet train`')}",
        f"[tasks.{name}.labels]",
        *(f"{json.dumps(label)} = {json.dumps(label)}" for label in labels),
    ]
    return "\n".join(lines) + "\n" + tier_lines


def append_entry(config_file: Path, entry: str, task: str) -> None:
    """Append `entry` to the user's task config, after checking that the file
    does not define `task` yet and that the result parses.

    Raises ConfigError (the file and what to do) otherwise; the file is then unchanged."""
    before = config_file.read_text("utf-8") if config_file.exists() else ""
    if config_file.exists() and task in read_document(config_file).get("tasks", {}):
        raise ConfigError(
            f"{config_file} already defines task {task!r}: put the printed "
            f"[[tasks.{task}.ladder]] lines first in its ladder by hand"
        )
    after = before + ("\n" if before and not before.endswith("\n") else "") + "\n" + entry
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    tmp.write_text(after, encoding="utf-8")
    try:
        load_tasks(tmp)
    except ConfigError as e:
        tmp.unlink()
        raise ConfigError(f"the entry would not parse in {config_file}: {e}") from e
    tmp.replace(config_file)
