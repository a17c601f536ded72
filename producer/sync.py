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

from db import history, triggers
from db.engine import get_engine, transaction
from db.sync import SyncReport, sync_source
from fleet.config.settings import Settings
from fleet.config.taskconfig import ConfigError, SourceSpec, TaskSpec

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


def sync_sources(
    settings: Settings,
    specs: Sequence[SourceSpec],
    *,
    full: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> list[SyncReport]:
    """One pass of each source, in order. Raises db.sync.SyncError on a source
    that cannot be read (the ones before it are synced and recorded)."""
    fleet = get_engine(settings.db_url())
    source = get_engine(settings.source_db_url())
    reports = []
    for spec in specs:
        step = (lambda n, _s=spec.name: progress(_s, n)) if progress else None
        report = sync_source(fleet, source, spec, full=full, progress=step)
        log.info(
            "synced source=%s full=%s read=%d new=%d changed=%d unchanged=%d gone=%d bad=%d "
            "in %.1fs",
            spec.name,
            report.full,
            report.read,
            report.new,
            report.changed,
            report.unchanged,
            report.gone + report.deleted,
            len(report.bad),
            report.seconds,
        )
        reports.append(report)
    return reports


def beat_tick(settings: Settings, sources: dict[str, SourceSpec]) -> list[dict[str, Any]]:
    """A `fleet beat` sync tick. With triggers installed on a source, a tick with
    nothing marked costs one query and syncs nothing; a marked change is
    consumed and the source synced (a delete marked: with the key scan)."""
    if not sources:
        return []
    engine = get_engine(settings.source_db_url())
    marked = triggers.take_marks(engine, list(sources))
    out = []
    for spec in sources.values():
        if spec.name in marked.installed and spec.name not in marked.changed:
            continue
        deletes = marked.deletes.get(spec.name)
        report = sync_source(
            get_engine(settings.db_url()),
            engine,
            spec,
            detect_deletes=deletes if spec.name in marked.installed else None,
        )
        out.append(report.as_dict())
    return out


def current_revisions(spec: TaskSpec, settings: Settings) -> list[str]:
    """The revisions (and tier names) of a task's ladder as it resolves now: the
    ladder `fleet promote` recorded, if any, else the task config's."""
    from db.ladders import effective_tasks
    from workers.hub import ModelNotCached, resolve_tier

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
    from db.sync import SyncError
    from fleet.config.taskconfig import load_sources

    out: dict[str, Any] = {}
    try:
        sources = load_sources(settings.config_file)
    except ConfigError as e:
        log.error("sources not synced: %s", e)
        return {"error": str(e)}
    for spec in sources.values():
        try:
            out[spec.name] = sync_sources(settings, [spec])[0].as_dict()
        except SyncError as e:
            log.error("%s; fix the source in the task config (`fleet sync` to retry)", e)
            out[spec.name] = {"error": str(e)}
        except Exception as e:  # e.g. the source database unreachable: the run goes on
            first = str(e).splitlines()[0] if str(e) else ""
            log.error(
                "source %r not synced (%s: %s); check FLEET_SOURCE_DATABASE_URL, "
                "`fleet sync` to retry",
                spec.name,
                type(e).__name__,
                first,
            )
            out[spec.name] = {"error": f"{type(e).__name__}: {first}"}
    if settings.rerun_stale:
        out["rerun"] = rerun_stale(settings.db_url(), settings, specs)
        log.info("rerun of stale results: %s", out["rerun"])
    return out
