"""Tasks and their model ladders, from a TOML file (the bundled
fleet/data/tasks.toml unless FLEET_CONFIG_FILE points elsewhere).

A task is a named job over one kind of source (`intent` over conversations,
`transcribe` over audio files) run by one model kind, with a ladder of model
tiers, largest first. A worker serves one task and holds one tier at a time.
A source (`[sources.<name>]`) is a table or query that `fleet sync` copies in (db.sync).

Imports nothing from the project: every layer reads its config from here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# "fake" is the shipped fake model (workers.adapters.fake) for tests and benchmarks.
KINDS = ("sequence_classify", "zero_shot", "llm_classify", "transcribe", "fake")
SOURCES = ("conversation", "audio")


# A source's row shapes (db.sync): `conversation` has a messages jsonb column,
# `messages` one row per message, folded in position order.
SYNC_SHAPES = ("conversation", "messages")
# What a source row that disappeared does to the fleet's copy: `mark` its items
# gone, or `delete` the rows and items.
ON_DELETE = ("mark", "delete")


class ConfigError(ValueError):
    """The task config is unreadable or invalid; the message names the task or
    source, the key and what is allowed."""


@dataclass(frozen=True)
class TierSpec:
    """One rung of a task's model ladder (largest first in the config)."""

    name: str
    path: str
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_length: int = 512
    max_batch_tokens: int = 16384  # starting budget (padded cost = longest x count)
    min_batch_tokens: int = 0  # floor of the adaptive budget; 0 = one item's cost
    footprint_mb: float | None = None  # estimated device memory; None = from the weights' size
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSpec:
    """One declared source (db.sync reads it). Exactly one of `query` and `table` is set."""

    name: str
    kind: str = "conversation"  # conversation | audio
    shape: str = "conversation"  # conversation (messages jsonb) | messages (one row each)
    query: str | None = None
    table: str | None = None
    chunk: int = 5000  # rows per server-side cursor fetch and per write transaction
    overlap_seconds: float = 60.0
    detect_deletes: bool = True
    on_delete: str = "mark"  # mark (items gone) | delete (rows and items removed)
    # Tables `fleet sync --install-triggers` watches (default: `table`).
    trigger_tables: tuple[str, ...] = ()

    @property
    def select(self) -> str:
        """The source as a sub-select."""
        return self.query.strip().rstrip(";") if self.query else f"SELECT * FROM {self.table}"


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
    # A cascade: results under `escalate_below` (calibrated confidence, 0-1) also get an
    # item on the stronger task `escalate_to`, whose answer becomes the final label
    # (the fleet_latest_results view; workers.cascade).
    escalate_to: str | None = None
    escalate_below: float = 0.0

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
            if k
            not in {
                "kind",
                "source",
                "ladder",
                "labels",
                "input_from",
                "then",
                "description",
                "escalate_to",
                "escalate_below",
            }
        }
        escalate_below = raw.get("escalate_below", 0.0)
        if not isinstance(escalate_below, int | float) or not 0 <= escalate_below <= 1:
            raise ConfigError(
                f"task {name!r}: escalate_below must be a confidence between 0 and 1, got "
                f"{escalate_below!r} (pick one with `fleet calibrate --target-escalation`)"
            )
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
            escalate_to=raw.get("escalate_to"),
            escalate_below=float(escalate_below),
        )
    for spec in tasks.values():
        for other in (*spec.then, *([spec.input_from] if spec.input_from else [])):
            if other not in tasks:
                raise ConfigError(f"task {spec.name!r} refers to unknown task {other!r}")
        _check_escalation(spec, tasks)
    return tasks


def _check_escalation(spec: TaskSpec, tasks: dict[str, TaskSpec]) -> None:
    """An escalation target must exist, read the same source and answer with labels."""
    target = spec.escalate_to
    if target is None:
        return
    if target not in tasks:
        raise ConfigError(f"task {spec.name!r}: escalate_to names unknown task {target!r}")
    strong = tasks[target]
    if target == spec.name or strong.escalate_to is not None:
        raise ConfigError(
            f"task {spec.name!r}: escalate_to {target!r} must be another task that does not "
            "escalate itself (one step: cheap tier, then strong tier)"
        )
    if strong.source != spec.source or strong.input_from != spec.input_from:
        raise ConfigError(
            f"task {spec.name!r}: escalate_to {target!r} reads {strong.source} "
            f"(input_from {strong.input_from}); both tiers must read the same items"
        )
    if strong.kind == "transcribe":
        raise ConfigError(f"task {spec.name!r}: escalate_to {target!r} gives no label")


def load_document(path: Path | None = None) -> dict[str, Any]:
    """The task config file as a TOML document (the bundled one when `path` is None)."""
    if path is None:
        text = resources.files("fleet").joinpath("data/tasks.toml").read_text("utf-8")
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read task config {path}: {e.strerror}") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"task config {path or 'tasks.toml'} is not valid TOML: {e}") from e


def load_tasks(path: Path | None = None) -> dict[str, TaskSpec]:
    return parse_tasks(load_document(path))


def load_sources(path: Path | None = None) -> dict[str, SourceSpec]:
    """The `[sources.<name>]` tables of the task config (see db.sync).

    Raises ConfigError when the file is unreadable or a table is invalid."""
    return parse_sources(load_document(path))


_SOURCE_KEYS = {
    "kind",
    "shape",
    "query",
    "table",
    "chunk",
    "overlap_seconds",
    "detect_deletes",
    "on_delete",
    "trigger_tables",
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def parse_sources(doc: dict[str, Any]) -> dict[str, SourceSpec]:
    """Validate every `[sources.<name>]` table into a SourceSpec; ConfigError names
    the source, the key and what is allowed."""
    raw_sources = doc.get("sources", {})
    if not isinstance(raw_sources, dict):
        raise ConfigError("`sources` must be a table of [sources.<name>] tables")
    return {name: _source(name, raw) for name, raw in raw_sources.items()}


def _source_names(name: str, raw: Any) -> tuple[str | None, str | None]:
    where = f"source {name!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, e.g. [sources.{name}]")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name == "ingest":
        raise ConfigError(
            f"{where}: names are 1-64 letters, digits, '_', '.', '-' ('ingest' is reserved "
            "for rows `fleet ingest` read from files)"
        )
    unknown = sorted(set(raw) - _SOURCE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_SOURCE_KEYS))}"
        )
    query, table = raw.get("query"), raw.get("table")
    if (query is None) == (table is None):
        raise ConfigError(
            f"{where}: give exactly one of `query` (SQL) or `table` (a table or view)"
        )
    if table is not None and not (isinstance(table, str) and _IDENT.match(table)):
        raise ConfigError(f"{where}: table must be a name such as app.conversations, got {table!r}")
    if query is not None and not (isinstance(query, str) and query.strip()):
        raise ConfigError(f"{where}: query must be a non-empty SQL string")
    return query, table


def _source(name: str, raw: Any) -> SourceSpec:
    where = f"source {name!r}"
    query, table = _source_names(name, raw)
    kind = raw.get("kind", "conversation")
    if kind not in SOURCES:
        raise ConfigError(f"{where}: kind must be one of {SOURCES}, got {kind!r}")
    shape = raw.get("shape", "conversation")
    if shape not in SYNC_SHAPES:
        raise ConfigError(f"{where}: shape must be one of {SYNC_SHAPES}, got {shape!r}")
    on_delete = raw.get("on_delete", "mark")
    if on_delete not in ON_DELETE:
        raise ConfigError(f"{where}: on_delete must be one of {ON_DELETE}, got {on_delete!r}")
    chunk = raw.get("chunk", 5000)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= 1_000_000:
        raise ConfigError(f"{where}: chunk must be an integer from 1 to 1000000, got {chunk!r}")
    overlap = raw.get("overlap_seconds", 60.0)
    if not isinstance(overlap, int | float) or isinstance(overlap, bool) or overlap < 0:
        raise ConfigError(f"{where}: overlap_seconds must be a number >= 0, got {overlap!r}")
    detect = raw.get("detect_deletes", True)
    if not isinstance(detect, bool):
        raise ConfigError(f"{where}: detect_deletes must be true or false, got {detect!r}")
    triggers = raw.get("trigger_tables", [table] if table else [])
    if not isinstance(triggers, list) or not all(
        isinstance(t, str) and _IDENT.match(t) for t in triggers
    ):
        raise ConfigError(f"{where}: trigger_tables must be a list of table names")
    return SourceSpec(
        name=name,
        kind=kind,
        shape=shape if kind == "conversation" else "conversation",
        query=query,
        table=table,
        chunk=chunk,
        overlap_seconds=float(overlap),
        detect_deletes=detect,
        on_delete=on_delete,
        trigger_tables=tuple(triggers),
    )


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
