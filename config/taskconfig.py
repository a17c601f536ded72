"""Tasks and their model ladders, from a TOML file: the bundled
config/data/tasks.toml, extended by the user's FLEET_CONFIG_FILE.

A user's file adds to the bundled tasks and label sets: a label set of the
same name replaces the bundled one, a task of the same name is updated key by
key (`[[tasks.intent.ladder]]` alone swaps intent's models), a file with only
`[sources.*]` keeps every bundled task. `include_bundled = false` at the top of the file makes it
the whole config instead (`merge_documents`).

A task is a named job over one kind of source (`intent` over conversations,
`transcribe` over audio files) run by one model kind, with a ladder of model
tiers, largest first. A worker serves one task and holds one tier at a time.
A source (`[sources.<name>]`) is a table or query that `fleet sync` copies in (db.sync).

Imports nothing from the project: every layer reads its config from here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from config.data import data_path

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
    # The mass-delete guard: a pass that would mark more than `mass_delete_rows`
    # rows and more than `mass_delete_share` of the source gone marks none.
    mass_delete_rows: int = 10
    mass_delete_share: float = 0.10
    allow_mass_delete: bool = False
    # `fleet nightly` makes its pass a full one when the last is older (None: never).
    full_every_seconds: float | None = None

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


def with_ladders(
    tasks: dict[str, TaskSpec], ladders: dict[str, list[dict[str, Any]]]
) -> dict[str, TaskSpec]:
    """`tasks` with each named task's ladder replaced by `ladders[task]` (tier tables
    as in [[tasks.T.ladder]]): the ladders `fleet promote` recorded in the database
    override the file's. Raises ConfigError for an empty ladder or a tier without 'path'."""
    out = dict(tasks)
    for name, raw in ladders.items():
        if name in out:
            if not raw:
                raise ConfigError(f"task {name!r}: the promoted ladder is empty")
            ladder = tuple(_tier(name, i, dict(t)) for i, t in enumerate(raw))
            out[name] = replace(out[name], ladder=ladder)
    return out


def tier_table(tier: TierSpec) -> dict[str, Any]:
    """A tier as its [[tasks.T.ladder]] table (options inline), the inverse of parsing."""
    table: dict[str, Any] = {
        "name": tier.name,
        "path": tier.path,
        "dtype": tier.dtype,
        "max_length": tier.max_length,
        "max_batch_tokens": tier.max_batch_tokens,
        "min_batch_tokens": tier.min_batch_tokens,
    }
    if tier.footprint_mb is not None:
        table["footprint_mb"] = tier.footprint_mb
    return {**table, **tier.options}


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
        top_k = extra.get("top_k")
        if top_k is not None and (
            kind != "sequence_classify"
            or not isinstance(top_k, int)
            or isinstance(top_k, bool)
            or top_k < 1
        ):
            raise ConfigError(
                f"task {name!r}: top_k (how many labels' probabilities `scores` keep; default "
                f"every label up to 32) is an integer >= 1 for sequence_classify, got {top_k!r}"
            )
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


# The top-level keys a task config may hold.
TOP_KEYS = ("include_bundled", "labels", "tasks", "sources")


def bundled_document() -> dict[str, Any]:
    """The bundled config/data/tasks.toml as a TOML document."""
    text = data_path("tasks.toml").read_text("utf-8")
    return tomllib.loads(text)


def read_document(path: Path) -> dict[str, Any]:
    """One task config file as a TOML document, as written (no merging).

    Raises ConfigError when the file is unreadable, not TOML or has a top-level
    key other than TOP_KEYS (a typo such as `[source.app]` would otherwise be ignored)."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read task config {path}: {e.strerror}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"task config {path} is not valid TOML: {e}") from e
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"task config {path}: unknown top-level key(s) {', '.join(unknown)}; "
            f"known: {', '.join(TOP_KEYS)}"
        )
    return doc


def merge_documents(bundled: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The config in force: the user's document over the bundled one.

    Label sets and tasks are merged by name: a label set of the same name
    replaces the bundled one; a task of the same name is updated key by key (a
    `ladder` given replaces the bundled ladder, the kind and labels stay).
    Sources come from the user's file only. With `include_bundled = false` the user's document is the whole config.
    Raises ConfigError when include_bundled is not a boolean or a section is not a table.
    """
    include = user.get("include_bundled", True)
    if not isinstance(include, bool):
        raise ConfigError(f"include_bundled must be true or false, got {include!r}")
    merged = {k: v for k, v in user.items() if k != "include_bundled"}
    if not include:
        return merged
    for section in ("labels", "tasks"):
        mine = user.get(section, {})
        if not isinstance(mine, dict):
            raise ConfigError(f"`{section}` must be a table of [{section}.<name>] tables")
        merged[section] = {**bundled.get(section, {}), **mine}
    for name, task in user.get("tasks", {}).items():
        base = bundled.get("tasks", {}).get(name)
        if isinstance(base, dict) and isinstance(task, dict):
            merged["tasks"][name] = {
                **base,
                **task,
            }  # key by key: a ladder given replaces the ladder
    return merged


def load_document(path: Path | None = None) -> dict[str, Any]:
    """The task config in force as a TOML document: the bundled one, extended
    by the file at `path` when given (`merge_documents`). Raises ConfigError."""
    if path is None:
        return bundled_document()
    return merge_documents(bundled_document(), read_document(path))


def task_origins(path: Path | None = None) -> dict[str, str]:
    """Where each task in force is defined: {task: "bundled" | the file's path}."""
    bundled = set(bundled_document().get("tasks", {}))
    user = set(read_document(path).get("tasks", {})) if path is not None else set()
    return {
        name: (str(path) if name in user else "bundled")
        for name in load_document(path).get("tasks", {})
        if name in user or name in bundled
    }


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
    "mass_delete_rows",
    "mass_delete_share",
    "allow_mass_delete",
    "full_every",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(where: str, value: Any) -> float | None:
    """'7d', '12h', '30m', '90s' (or a number of seconds) -> seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f'{where}: full_every must be a duration such as "7d" or "12h", got {value!r}'
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


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
        **_guards(where, raw),
    )


def _guards(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    rows = raw.get("mass_delete_rows", 10)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ConfigError(f"{where}: mass_delete_rows must be an integer >= 0, got {rows!r}")
    share = raw.get("mass_delete_share", 0.10)
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
        raise ConfigError(f"{where}: mass_delete_share must be a number from 0 to 1, got {share!r}")
    allow = raw.get("allow_mass_delete", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{where}: allow_mass_delete must be true or false, got {allow!r}")
    return {
        "mass_delete_rows": rows,
        "mass_delete_share": float(share),
        "allow_mass_delete": allow,
        "full_every_seconds": parse_every(where, raw.get("full_every")),
    }


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


# Tier options that name another model folder (resolved like a tier's path).
MODEL_FOLDER_OPTIONS = ("turn_selector",)


def with_model_folders(tier: TierSpec, models_dir: Path) -> TierSpec:
    """`tier` with its model-folder options (MODEL_FOLDER_OPTIONS, e.g. llm_classify's
    `turn_selector`) made absolute: a relative folder is under `models_dir`, as a
    tier's own path is. The tier itself when it names none."""
    named = {k: v for k, v in tier.options.items() if k in MODEL_FOLDER_OPTIONS and v}
    if not named:
        return tier
    resolved = {
        k: str(resolve_model_path(TierSpec(name=tier.name, path=str(v)), models_dir))
        for k, v in named.items()
    }
    return replace(tier, options={**tier.options, **resolved})
