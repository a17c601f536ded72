"""Syncing every declared source, and putting back results of an old model.

The core of `fleet sync` (alone, at the start of `fleet nightly`, on a `fleet
beat` tick) over db.sync, and of `fleet rerun` over db.history. Sources are read
from FLEET_SOURCE_DATABASE_URL when set, else from the fleet's own database.

    sync_sources   every source (or the named ones), one db.sync pass each
    beat_tick      triggers installed: sync only the sources with a change marked;
                   otherwise an incremental pass of each
    rerun          a task's items whose result came from another model revision
                   back to pending (old results kept in result_history)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from config.settings import Settings
from config.taskconfig import ConfigError, SourceSpec, TaskSpec
from db import history, triggers
from db.engine import get_engine, transaction
from db.sync import SyncError, SyncReport, sync_source

log = logging.getLogger("fleet.sync")


def pick(sources: dict[str, SourceSpec], names: Sequence[str]) -> list[SourceSpec]:
    """The named sources (all when none named); ConfigError for an unknown name."""
    if not names:
        return list(sources.values())
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise ConfigError(
            f"unknown source(s) {', '.join(unknown)}; declared: "
            f"{', '.join(sorted(sources)) or 'none (add [sources.<name>] to the task config)'}"
        )
    return [sources[n] for n in names]


def _due_full(settings: Settings, spec: SourceSpec) -> bool:
    """Whether the source's `full_every` says its next pass is a full one."""
    if spec.full_every_seconds is None:
        return False
    from sqlalchemy import text

    with transaction(settings.db_url()) as session:
        age = session.execute(
            text(
                "SELECT extract(epoch FROM now() - last_full_at) FROM sync_state WHERE source = :s"
            ),
            {"s": spec.name},
        ).scalar_one_or_none()
    return age is None or float(age) >= spec.full_every_seconds


def sync_one(
    settings: Settings,
    spec: SourceSpec,
    *,
    full: bool = False,
    detect_deletes: bool | None = None,
    allow_mass_delete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SyncReport:
    """One pass of one source. A source that fails as a whole (its query, its
    columns, its database) comes back as a report with `error` set, never raised:
    the sources after it still sync."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        report = sync_source(
            get_engine(settings.db_url()),
            get_engine(settings.source_db_url()),
            spec,
            full=full,
            detect_deletes=detect_deletes,
            allow_mass_delete=allow_mass_delete,
            progress=progress,
        )
    except (SyncError, DBAPIError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, DBAPIError):
            first = f"source {spec.name!r} not synced: {type(e.orig or e).__name__}: " + (
                str(e.orig).splitlines()[0] if e.orig else first
            )
        log.error("%s; fix the source (`fleet sync --source %s` to retry)", first, spec.name)
        unreachable = isinstance(e, OperationalError) or isinstance(e.__cause__, OperationalError)
        return SyncReport(spec.name, full=full, error=first, unreachable=unreachable)
    log.info(
        "synced source=%s full=%s read=%d new=%d changed=%d unchanged=%d gone=%d refused=%d "
        "noted=%d withheld=%d in %.1fs",
        spec.name,
        report.full,
        report.read,
        report.new,
        report.changed,
        report.unchanged,
        report.gone + report.deleted,
        len(report.bad),
        len(report.notes),
        report.withheld,
        report.seconds,
    )
    for warning in report.warnings:
        log.warning("source %s: %s", spec.name, warning)
    return report


def sync_sources(
    settings: Settings,
    specs: Sequence[SourceSpec],
    *,
    full: bool = False,
    allow_mass_delete: bool = False,
    scheduled: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> list[SyncReport]:
    """One pass of each source, in order; a failing source is a report with its
    `error` (sync_one) and the rest go on. `scheduled` (nightly): a source whose
    `full_every` has passed gets a full pass."""
    reports = []
    for spec in specs:
        step = (lambda n, _s=spec.name: progress(_s, n)) if progress else None
        whole = full or (scheduled and _due_full(settings, spec))
        reports.append(
            sync_one(settings, spec, full=whole, allow_mass_delete=allow_mass_delete, progress=step)
        )
    return reports


def beat_tick(settings: Settings, sources: dict[str, SourceSpec]) -> list[dict[str, Any]]:
    """A `fleet beat` sync tick. With triggers installed on a source, a tick with
    nothing marked costs one query and syncs nothing; a marked source is synced
    (a delete marked: with the key scan) and its marks are consumed only when
    that pass succeeded: a failed pass leaves them for the next tick."""
    if not sources:
        return []
    engine = get_engine(settings.source_db_url())
    marked = triggers.peek_marks(engine, list(sources))
    out = []
    for spec in sources.values():
        if spec.name in marked.installed and spec.name not in marked.changed:
            continue
        deletes = marked.deletes.get(spec.name)
        report = sync_one(
            settings, spec, detect_deletes=deletes if spec.name in marked.installed else None
        )
        if report.error is None and spec.name in marked.changed:
            triggers.consume(engine, marked.ids[spec.name])
        out.append(report.as_dict())
    return out


def current_revisions(spec: TaskSpec, settings: Settings) -> list[str]:
    """The revisions (and tier names) of a task's ladder as it resolves now: the
    ladder `fleet promote` recorded, if any, else the task config's."""
    from db.ladders import effective_tasks
    from wire.hub import ModelNotCached, resolve_tier

    with transaction(settings.db_url()) as session:
        spec = effective_tasks(session, {spec.name: spec})[spec.name]

    out: list[str] = []
    for tier in spec.ladder:
        try:
            revision = resolve_tier(tier, settings.resolved_models_dir).revision
        except ModelNotCached:
            continue
        if revision:
            out.append(revision)
    return out


def rerun(
    url: str, *, task: str, current: Sequence[str], since: str | None = None, dry_run: bool = False
) -> int:
    """Put back the task's done/failed items whose result came from a model version
    not in `current` (see db.history.stale_items). Returns the number of items."""
    with transaction(url) as session:
        ids = history.stale_items(session, task=task, current=current, since=since)
        if dry_run or not ids:
            return len(ids)
        return history.reset_items(session, item_ids=ids, reason="rerun")


def rerun_stale(url: str, settings: Settings, specs: Sequence[TaskSpec]) -> dict[str, int]:
    """FLEET_RERUN_STALE: for every task, the items made by a revision its ladder no
    longer has. A task none of whose tiers resolves is left alone."""
    out: dict[str, int] = {}
    for spec in specs:
        current = current_revisions(spec, settings)
        if current:
            out[spec.name] = rerun(url, task=spec.name, current=current)
    return out


def before_discovery(settings: Settings, specs: Sequence[TaskSpec]) -> dict[str, Any]:
    """What a nightly run does before it discovers: sync every declared source
    (incremental) and, with FLEET_RERUN_STALE, put back results of old model
    revisions. A source that fails is logged and skipped: the rest of the run
    goes on with what the fleet already has."""
    from config.taskconfig import load_sources

    out: dict[str, Any] = {}
    try:
        sources = load_sources(settings.config_file)
    except ConfigError as e:
        log.error("sources not synced: %s", e)
        return {"error": str(e)}
    for report in sync_sources(settings, list(sources.values()), scheduled=True):
        out[report.source] = report.as_dict()
    if settings.rerun_stale:
        out["rerun"] = rerun_stale(settings.db_url(), settings, specs)
        log.info("rerun of stale results: %s", out["rerun"])
    return out
