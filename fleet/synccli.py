"""`fleet sync`, `fleet rerun` and `fleet models pull`: the user's own data and models.

Registered on the `fleet` group by fleet.cli (`register`). Thin: the work is in
producer.sync, db.sync, db.triggers and workers.hub.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

EXIT_CONFIG, EXIT_SERVICE = 2, 3


def _fail(message: str, code: int = EXIT_CONFIG) -> Any:
    from fleet.cli import fail

    return fail(message, code)


def _sources(ctx: Any) -> Any:
    from fleet.config.taskconfig import ConfigError, load_sources

    try:
        return load_sources(ctx.settings.config_file)
    except ConfigError as e:
        _fail(str(e))


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
    kind = "full pass" if r.full else "incremental"
    gone = f", {r.gone} gone" if r.gone else ""
    deleted = f", {r.deleted} deleted" if r.deleted else ""
    back = f" ({r.items_reset} items back to pending)" if r.items_reset else ""
    return (
        f"{r.source}: {kind}, read {r.read:,} rows -> {r.records:,} records: {r.new:,} new, "
        f"{r.changed:,} changed{back}, {r.unchanged:,} unchanged{gone}{deleted}, "
        f"{len(r.bad)} bad in {r.seconds:.1f}s"
    )


@click.command("sync")
@click.option("--source", "-s", "names", multiple=True, help="Only this source (repeat).")
@click.option("--full", is_flag=True, help="Read every row, not only those past the watermark.")
@click.option(
    "--install-triggers",
    is_flag=True,
    help="Continuous mode: put a statement trigger on each source table that marks it "
    "changed (see FLEET_SYNC_SECONDS); no sync runs.",
)
@click.option("--remove-triggers", is_flag=True, help="Drop the triggers again; no sync runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def sync_cmd(
    ctx: Any,
    names: tuple[str, ...],
    full: bool,
    install_triggers: bool,
    remove_triggers: bool,
    as_json: bool,
) -> None:
    """Copy new and changed rows of the declared [sources.*] into the fleet.

    Edited or grown conversations go back to pending for every task (the old
    result is kept in result_history); rows gone from the source are marked
    gone. Sources read FLEET_SOURCE_DATABASE_URL when set, else DATABASE_URL.
    """
    from sqlalchemy.exc import OperationalError

    from db.sync import SyncError
    from fleet.config.taskconfig import ConfigError
    from producer.sync import pick, sync_sources

    sources = _sources(ctx)
    if not sources:
        _fail(
            f"no [sources.<name>] in the task config ({ctx.settings.config_file or 'the bundled tasks.toml'}): "
            "declare one (see the README, 'Pointing the fleet at your own data')"
        )
    try:
        specs = pick(sources, names)
    except ConfigError as e:
        _fail(str(e))
    settings = ctx.services()
    if install_triggers or remove_triggers:
        _triggers(settings, specs, remove=remove_triggers)
        return
    try:
        with _live(as_json) as step:
            reports = sync_sources(settings, specs, full=full, progress=step)
    except SyncError as e:
        _fail(f"{e}. Fix the source in the task config and run `fleet sync` again.")
    except OperationalError as e:
        _fail(
            f"cannot reach the source database ({str(e.orig).splitlines()[0] if e.orig else e}); "
            "check FLEET_SOURCE_DATABASE_URL",
            EXIT_SERVICE,
        )
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
        return
    for r in reports:
        click.echo(_line(r))
        for ext, reason in r.bad[:10]:
            click.echo(f"  not synced: {ext or '(no id)'}: {reason}", err=True)
        if len(r.bad) > 10:
            click.echo(f"  ... and {len(r.bad) - 10} more (--json lists 100)", err=True)


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
            _fail(str(e))


def _since(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value!r} is not a date or time; use e.g. 2026-11-01 or 2026-11-01T12:00")
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def rerun_cmd(
    ctx: Any,
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
        _fail(
            f"no tier of task {task_name!r} resolves to a model here (`fleet models prepare` or "
            "`fleet models pull`), so the current revision is unknown: pass --model-not REVISION"
        )
    n = rerun(settings.db_url(), task=task_name, current=keep, since=_since(since), dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"task": task_name, "current": keep, "items": n, "dry_run": dry_run}))
        return
    verb = "would put back" if dry_run else "put back"
    click.echo(f"{task_name}: {verb} {n:,} items whose result is not from {', '.join(keep)}")


@click.command("pull")
@click.option("--task", "-t", "task_names", multiple=True, help="Only these tasks' ladders.")
@click.pass_obj
def models_pull(ctx: Any, task_names: tuple[str, ...]) -> None:
    """Download every ladder model named by Hugging Face id into the HF cache.

    Run it where the hub is reachable (safetensors, configuration and tokenizer
    files only; no code is ever run from a model repository). Workers then load
    from the cache (HF_HOME) with local files only.
    """
    from workers.hub import ModelNotCached, hub_cache, hub_id, pull, tier_revision

    tasks = ctx.tasks()
    chosen = [ctx.task(n) for n in task_names] if task_names else list(tasks.values())
    models_dir = ctx.settings.resolved_models_dir
    wanted: dict[tuple[str, str | None], str] = {}
    for spec in chosen:
        for tier in spec.ladder:
            repo = hub_id(tier, models_dir)
            if repo is not None:
                wanted.setdefault((repo, tier_revision(tier)), f"{spec.name}/{tier.name}")
    if not wanted:
        click.echo("no ladder tier names a Hugging Face id (org/name): nothing to pull")
        return
    failed = 0
    for (repo, revision), where in wanted.items():
        click.echo(
            f"pulling {repo}{'@' + revision if revision else ''} ({where}) into {hub_cache()}"
        )
        try:
            pull(repo, revision, echo=click.echo)
        except ModelNotCached as e:
            click.echo(f"  {e}", err=True)
            failed += 1
        except Exception as e:  # the hub unreachable, a wrong id, no access
            click.echo(
                f"  cannot download {repo} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "run `fleet models pull` on a machine that can reach huggingface.co "
                "(HF_TOKEN for gated models), then copy its HF_HOME here",
                err=True,
            )
            failed += 1
    if failed:
        sys.exit(EXIT_SERVICE)


def register(main: click.Group, models: click.Group) -> None:
    """Add the commands to the `fleet` group and `fleet models`."""
    main.add_command(sync_cmd)
    main.add_command(rerun_cmd)
    models.add_command(models_pull)
