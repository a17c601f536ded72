"""Tasks and their model ladders, from a TOML file (the bundled
fleet/data/tasks.toml unless FLEET_CONFIG_FILE points elsewhere).

A task is a named job over one kind of source (`intent` over conversations,
`transcribe` over audio files) run by one model kind, with a ladder of model
tiers, largest first. A worker serves one task and holds one tier at a time.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from workers.adapters.base import TierSpec

# "fake" is the shipped fake model (workers.adapters.fake) for tests and benchmarks.
KINDS = ("sequence_classify", "zero_shot", "llm_classify", "transcribe", "fake")
SOURCES = ("conversation", "audio")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    source: str  # conversation | audio
    ladder: tuple[TierSpec, ...]
    labels: dict[str, str] = field(default_factory=dict)  # label -> description
    input_from: str | None = None  # read the text another task produced (a transcript)
    then: tuple[str, ...] = ()  # tasks to create for each item this task finishes
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        return f"fleet.{self.name}"


def _tier(task: str, i: int, raw: dict[str, Any]) -> TierSpec:
    known = {
        "name",
        "path",
        "dtype",
        "max_length",
        "max_batch_tokens",
        "min_batch_tokens",
        "footprint_mb",
    }
    if "path" not in raw:
        raise ConfigError(f"task {task!r} ladder tier {i} has no 'path'")
    options = {k: v for k, v in raw.items() if k not in known}
    fields = {k: v for k, v in raw.items() if k in known}
    fields.setdefault("name", Path(str(raw["path"])).name)
    return TierSpec(**fields, options=options)


# Queues fleet.control (beat's control worker) and fleet.default (Celery's default).
RESERVED_NAMES = ("control", "default")


def parse_tasks(doc: dict[str, Any]) -> dict[str, TaskSpec]:
    label_sets: dict[str, dict[str, str]] = doc.get("labels", {})
    tasks: dict[str, TaskSpec] = {}
    for name, raw in doc.get("tasks", {}).items():
        if name in RESERVED_NAMES:
            raise ConfigError(
                f"task name {name!r} is reserved (queue fleet.{name} carries the fleet's own "
                "messages): rename the task"
            )
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"task {name!r}: kind must be one of {KINDS}, got {kind!r}")
        source = raw.get("source", "conversation")
        if source not in SOURCES:
            raise ConfigError(f"task {name!r}: source must be one of {SOURCES}, got {source!r}")
        ladder = tuple(_tier(name, i, t) for i, t in enumerate(raw.get("ladder", [])))
        if not ladder:
            raise ConfigError(f"task {name!r} has an empty model ladder")
        labels = raw.get("labels", {})
        if isinstance(labels, str):
            if labels not in label_sets:
                raise ConfigError(f"task {name!r} names label set {labels!r}, which is not defined")
            labels = label_sets[labels]
        extra = {
            k: v
            for k, v in raw.items()
            if k not in {"kind", "source", "ladder", "labels", "input_from", "then", "description"}
        }
        tasks[name] = TaskSpec(
            name=name,
            kind=kind,
            source=source,
            ladder=ladder,
            labels=dict(labels),
            input_from=raw.get("input_from"),
            then=tuple(raw.get("then", ())),
            description=raw.get("description", ""),
            options=extra,
        )
    for spec in tasks.values():
        for other in (*spec.then, *([spec.input_from] if spec.input_from else [])):
            if other not in tasks:
                raise ConfigError(f"task {spec.name!r} refers to unknown task {other!r}")
    return tasks


def load_tasks(path: Path | None = None) -> dict[str, TaskSpec]:
    if path is None:
        text = resources.files("fleet").joinpath("data/tasks.toml").read_text("utf-8")
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read task config {path}: {e.strerror}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"task config {path or 'tasks.toml'} is not valid TOML: {e}") from e
    return parse_tasks(doc)


def get_task(tasks: dict[str, TaskSpec], name: str) -> TaskSpec:
    try:
        return tasks[name]
    except KeyError:
        raise ConfigError(
            f"unknown task {name!r}; configured tasks: {', '.join(sorted(tasks)) or 'none'}"
        ) from None


def resolve_model_path(tier: TierSpec, models_dir: Path) -> Path:
    p = Path(tier.path).expanduser()
    return p if p.is_absolute() else models_dir / p
