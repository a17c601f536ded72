"""The data commands: `fleet settings`, `migrate`, `ingest conversations|audio`,
`sync` (the declared [sources.*]) and `rerun` (items whose result came from
another model version). Thin: the work is in producer.ingest, producer.sync,
db.sync, db.triggers and db.migrate.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from config.exitcodes import ExitCode
from config.settings import redact
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import json_option


@click.command("settings")
@json_option
@pass_fleet
def settings_cmd(ctx: FleetContext, as_json: bool) -> None:
    """Show the settings in force (secrets masked) and where each comes from."""
    s = ctx.settings
    out: dict[str, Any] = {}
    for name in type(s).model_fields:
        value = getattr(s, name)
        if name in ("database_url", "broker_url"):
            value = redact(value.get_secret_value()) if value is not None else "(embedded)"
        elif name == "source_database_url":  # a URL: show it with only its password hidden
            value = redact(value.get_secret_value()) if value is not None else None
        out[name] = str(value) if value is not None else None
    out["models_dir (resolved)"] = str(s.resolved_models_dir)
    out["audio_root (resolved)"] = str(s.resolved_audio_root)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for name, value in out.items():
        desc = type(s).model_fields[name].description if name in type(s).model_fields else ""
        click.echo(f"{name:24} {value}")
        if desc:
            click.echo(f"{'':24} {click.style(desc, dim=True)}")


@click.command("migrate")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--down", is_flag=True, help="Downgrade to --revision (default base) instead.")
@pass_fleet
def migrate_cmd(ctx: FleetContext, revision: str, down: bool) -> None:
    """Bring the database schema to the code's version (Alembic)."""
    from db.migrate import downgrade, upgrade
    from fleet.ops.services import ensure_services

    s = ensure_services(ctx.settings)
    if down:
        downgrade(s.db_url(), "base" if revision == "head" else revision)
    else:
        upgrade(s.db_url(), revision)
    click.echo(
        f"schema {'downgraded' if down else 'upgraded'} to {revision if not down or revision != 'head' else 'base'}"
    )


@click.group("ingest")
def ingest_cmd() -> None:
    """Put conversations or audio files into Postgres (idempotent on external_id)."""


@ingest_cmd.command("conversations")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_fleet
def ingest_conversations_cmd(ctx: FleetContext, path: Path, as_json: bool) -> None:
    """Ingest a JSONL file: one {"external_id", "messages": [{role, content}], ...} per line."""
    from fleet.observe.display import byte_progress
    from producer.ingest import ingest_conversations_file

    url = ctx.url()
    with (
        path.open("rb") as f,
        byte_progress(path.stat().st_size, f"ingest {path.name}", quiet=as_json) as advance,
    ):
        report = ingest_conversations_file(url, f, progress=advance)
    _print_ingest(report, as_json)


@ingest_cmd.command("audio")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
@pass_fleet
def ingest_audio_cmd(ctx: FleetContext, folder: Path, as_json: bool) -> None:
    """Register the audio files (wav, flac, ogg, mp3) under FOLDER, inside the audio root."""
    from producer.ingest import ingest_audio_dir

    s = ctx.services()
    try:
        report = ingest_audio_dir(s.db_url(), folder, audio_root=s.resolved_audio_root)
    except ValueError as e:
        fail(str(e), ExitCode.CONFIG)
    _print_ingest(report, as_json)


def _print_ingest(report: Any, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "read": report.read,
                    "inserted": report.inserted,
                    "already_present": report.already_present,
                    "bad": [{"line": n, "reason": r} for n, r in report.bad],
                }
            )
        )
        return
    click.echo(
        f"read {report.read}, inserted {report.inserted}, already present {report.already_present}, "
        f"bad {len(report.bad)}"
    )
    for lineno, reason in report.bad[:20]:
        click.echo(f"  line {lineno}: {reason}" if lineno else f"  {reason}", err=True)
    if len(report.bad) > 20:
        click.echo(
            f"  ... and {len(report.bad) - 20} more bad lines (use --json for all)", err=True
        )


@contextmanager
def _live(quiet: bool) -> Iterator[Callable[[str, int], None]]:
    """A live status line: rows read per source and the rate."""
    if quiet:
        yield lambda source, n: None
        return
    from rich.live import Live

    from fleet.observe.display import console

    seen: dict[str, int] = {}
    started = time.monotonic()
    with Live("", console=console, transient=True, refresh_per_second=4) as live:

        def step(source: str, n: int) -> None:
            seen[source] = seen.get(source, 0) + n
            rate = sum(seen.values()) / max(time.monotonic() - started, 1e-6)
            parts = ", ".join(f"{s}: {c:,} rows" for s, c in seen.items())
            live.update(f"syncing {parts} ({rate:,.0f} rows/s)")

        yield step


def _line(r: Any) -> str:
    if r.error:
        return f"{r.source}: FAILED: {r.error}"
    kind = "full pass" if r.full else "incremental"
    gone = f", {r.gone} gone" if r.gone else ""
    deleted = f", {r.deleted} deleted" if r.deleted else ""
    back = f" ({r.items_reset} items back to pending)" if r.items_reset else ""
    restored = f", {r.restored} results restored" if r.restored else ""
    noted = f", {len(r.notes)} with a note" if r.notes else ""
    return (
        f"{r.source}: {kind}, read {r.read:,} rows -> {r.records:,} records: {r.new:,} new, "
        f"{r.changed:,} changed{back}, {r.unchanged:,} unchanged{gone}{deleted}{restored}, "
        f"{len(r.bad)} refused{noted} in {r.seconds:.1f}s"
    )


def _details(r: Any) -> None:
    for warning in r.warnings:
        click.echo(f"  warning: {warning}", err=True)
    for label, rows in (("refused", r.bad), ("note", r.notes)):
        for ext, reason in rows[:10]:
            click.echo(f"  {label}: {ext or '(no id)'}: {reason}", err=True)
        if len(rows) > 10:
            click.echo(f"  ... and {len(rows) - 10} more (--json lists 100)", err=True)
    if r.bad or r.notes:
        click.echo("  every one is kept in sync_problems: `fleet status` counts them", err=True)


@click.command("sync")
@click.option("--source", "-s", "names", multiple=True, help="Only this source (repeat).")
@click.option("--full", is_flag=True, help="Read every row, not only those past the watermark.")
@click.option(
    "--allow-mass-delete",
    is_flag=True,
    help="Mark rows gone even when more than mass_delete_rows and mass_delete_share of a "
    "source disappeared at once (withheld otherwise).",
)
@click.option(
    "--install-triggers",
    is_flag=True,
    help="Continuous mode: put a statement trigger on each source table that marks it "
    "changed (see FLEET_SYNC_SECONDS); no sync runs.",
)
@click.option("--remove-triggers", is_flag=True, help="Drop the triggers again; no sync runs.")
@json_option
@pass_fleet
def sync_cmd(
    ctx: FleetContext,
    names: tuple[str, ...],
    full: bool,
    allow_mass_delete: bool,
    install_triggers: bool,
    remove_triggers: bool,
    as_json: bool,
) -> None:
    """Copy new and changed rows of the declared [sources.*] into the fleet.

    Edited or grown conversations go back to pending for every task (the old
    result is kept in result_history); rows gone from the source are marked
    gone (unless too many at once: see --allow-mass-delete). Rows that cannot be
    taken as they are are listed and kept in sync_problems. A source that fails
    is reported and the others still sync; the exit status is then 2 (3 when a
    database could not be reached).
    Sources read FLEET_SOURCE_DATABASE_URL when set, else DATABASE_URL.
    """
    from config.taskconfig import ConfigError
    from producer.sync import pick, sync_sources

    sources = ctx.sources()
    if not sources:
        fail(
            f"no [sources.<name>] in the task config ({ctx.settings.config_file or 'the bundled tasks.toml'}): "
            "declare one (see the README, 'Pointing the fleet at your own data')"
        )
    try:
        specs = pick(sources, names)
    except ConfigError as e:
        fail(str(e))
    settings = ctx.services()
    if install_triggers or remove_triggers:
        _triggers(settings, specs, remove=remove_triggers)
        return
    with _live(as_json) as step:
        reports = sync_sources(
            settings, specs, full=full, allow_mass_delete=allow_mass_delete, progress=step
        )
    failed = [r for r in reports if r.error]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for r in reports:
            click.echo(_line(r))
            _details(r)
        if failed:
            click.echo(
                f"{len(failed)} source(s) not synced: fix them in the task config or the "
                "source database and run `fleet sync` again",
                err=True,
            )
    if failed:
        unreachable = any(r.unreachable for r in failed)
        raise SystemExit(int(ExitCode.SERVICE if unreachable else ExitCode.CONFIG))


def _triggers(settings: Any, specs: Any, *, remove: bool) -> None:
    from db import triggers
    from db.engine import get_engine

    engine = get_engine(settings.source_db_url())
    for spec in specs:
        try:
            if remove:
                tables = triggers.remove(engine, spec.name)
                click.echo(f"{spec.name}: triggers removed from {', '.join(tables) or 'nothing'}")
            else:
                tables = triggers.install(engine, spec.name, spec.trigger_tables)
                click.echo(
                    f"{spec.name}: a statement trigger now marks changes to {', '.join(tables)}; "
                    + (
                        f"`fleet beat` syncs every {settings.sync_seconds:g}s"
                        if settings.sync_seconds
                        else "set FLEET_SYNC_SECONDS so that `fleet beat` picks them up"
                    )
                )
        except ValueError as e:
            fail(str(e))


def _since(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r} is not a date or time; use e.g. 2026-11-01 or 2026-11-01T12:00")
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.isoformat()


@click.command("rerun")
@click.option("--task", "-t", "task_name", required=True, help="Task name from the task config.")
@click.option(
    "--model-not",
    "current",
    multiple=True,
    help="Revision or tier name that is current (repeat); the rest is put back. "
    "Default: the revisions the task's ladder resolves to now.",
)
@click.option("--since", help="Only results made at or after this date/time (ISO, UTC default).")
@click.option("--dry-run", is_flag=True, help="Count the items; change nothing.")
@json_option
@pass_fleet
def rerun_cmd(
    ctx: FleetContext,
    task_name: str,
    current: tuple[str, ...],
    since: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Put back the items whose result came from another model version.

    Their results move to result_history; the next run classifies them again.
    """
    from producer.sync import current_revisions, rerun

    spec = ctx.task(task_name)
    settings = ctx.services()
    keep = list(current) or current_revisions(spec, settings)
    if not keep:
        fail(
            f"no tier of task {task_name!r} resolves to a model here (`fleet models prepare` or "
            "`fleet models pull`), so the current revision is unknown: pass --model-not REVISION"
        )
    n = rerun(settings.db_url(), task=task_name, current=keep, since=_since(since), dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"task": task_name, "current": keep, "items": n, "dry_run": dry_run}))
        return
    verb = "would put back" if dry_run else "put back"
    click.echo(f"{task_name}: {verb} {n:,} items whose result is not from {', '.join(keep)}")
