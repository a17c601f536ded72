"""`fleet backlog`, `enqueue`, `run`, `reconcile`, `retry` and `park`: the ledger's work, fed and driven."""

from __future__ import annotations

import json

import click

from config.exitcodes import ExitCode
from fleet.cli.context import FleetContext, fail, pass_fleet
from fleet.cli.output import (
    finish_run,
    json_option,
    local_workers_option,
    task_option,
)
from fleet.ops.pool import unwind_on_sigterm


@click.command("backlog")
@json_option
@pass_fleet
def backlog_cmd(ctx: FleetContext, as_json: bool) -> None:
    """Work items per task and status; then, per synced source, rows it synced that
    no task has an item for yet, its lag, and rows it could not take as they are."""
    from db import ledger
    from db.engine import transaction
    from db.syncstate import read_sources
    from fleet.observe.display import counts_table

    with transaction(ctx.url()) as session:
        counts = ledger.counts(session)
        sources = read_sources(session)
    if as_json:
        click.echo(json.dumps(counts))
        return
    if not counts:
        try:
            declared = bool(ctx.sources())
        except Exception:  # an unreadable config is `fleet sync`'s to report
            declared = False
        first = "`fleet sync`" if declared else "`fleet ingest ...`"
        click.echo(f"no work items yet: {first} then `fleet enqueue --task T`")
    else:
        counts_table(counts)
    for name, src in sources.items():
        lag = "never synced" if src.lag_seconds is None else f"synced {src.lag_seconds:,.0f}s ago"
        line = f"source {name}: {lag}, {src.undiscovered:,} rows not discovered yet"
        if src.refused or src.noted:
            line += f", {src.refused:,} refused and {src.noted:,} noted rows (sync_problems)"
        if src.last_error:
            line += f"; last sync FAILED: {src.last_error} (`fleet sync` to retry)"
        click.echo(line)


@click.command("enqueue")
@task_option
@click.option("--limit", type=click.IntRange(min=1), help="Most items to claim and send.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Items per batch (default FLEET_BATCH_SIZE)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be sent; claim nothing.")
@json_option
@pass_fleet
def enqueue_cmd(
    ctx: FleetContext,
    task_name: str,
    limit: int | None,
    batch_size: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Discover new items for a task, claim them and send batches of ids to its queue."""
    from fleet.observe.display import item_progress
    from producer.enqueue import enqueue as do_enqueue

    spec = ctx.task(task_name)
    s = ctx.services()
    bs = batch_size or s.batch_size
    with item_progress(f"enqueue {spec.name}", quiet=as_json or dry_run) as advance:
        report = do_enqueue(
            s.db_url(),
            ctx.app(),
            spec,
            limit=limit,
            batch_size=bs,
            lease_seconds=s.lease_seconds,
            dry_run=dry_run,
            progress=advance,
        )
    if as_json:
        click.echo(json.dumps(report.__dict__))
    elif dry_run:
        click.echo(
            f"dry run: would send {report.items} items in {report.batches} batches to {spec.queue}"
        )
    else:
        click.echo(
            f"sent {report.items} items in {report.batches} batches to {spec.queue} "
            f"({report.discovered} newly discovered)"
        )


@click.command("run")
@click.option(
    "--task", "-t", "task_names", multiple=True, required=True, help="Task(s) to run; repeat."
)
@click.option(
    "--with-follow-ups/--no-follow-ups",
    default=True,
    show_default=True,
    help="Also wait for tasks that follow (transcribe -> audio_intent).",
)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 4).")
@click.option(
    "--trigger", default="manual", show_default=True, help="Recorded on the run (manual|nightly)."
)
@local_workers_option
@json_option
@pass_fleet
def run_cmd(
    ctx: FleetContext,
    task_names: tuple[str, ...],
    with_follow_ups: bool,
    timeout: float | None,
    trigger: str,
    local_workers: bool | None,
    as_json: bool,
) -> None:
    """Drive tasks to completion: feed the queues, reconcile, show progress.

    Workers must be running (`fleet worker --task T`), or started by this run
    with --local-workers. Exit 1 if items ended failed or dead.
    """
    from fleet.ops.localworkers import LocalWorkersFailed, drive_with_local_workers, wanted
    from producer.drive import run_specs
    from producer.runner import run_until_done

    local = wanted(local_workers, ctx.settings)  # before services() fills in the URLs
    specs = [ctx.task(n) for n in task_names]
    if with_follow_ups:
        specs = run_specs(ctx.tasks(), task_names)
    s = ctx.services()
    unwind_on_sigterm()
    try:
        report = drive_with_local_workers(
            specs,
            s,
            lambda progress, gate: run_until_done(
                s.db_url(),
                ctx.app(),
                specs,
                s,
                trigger=trigger,
                timeout=timeout,
                progress=progress,
                gate=gate,
            ),
            enabled=local,
            quiet=as_json,
        )
    except LocalWorkersFailed as e:
        fail(str(e), ExitCode.CONFIG)
    finish_run(report, as_json)


@click.command("reconcile")
@click.option("--task", "-t", "task_name", help="Only this task.")
@json_option
@pass_fleet
def reconcile_cmd(ctx: FleetContext, task_name: str | None, as_json: bool) -> None:
    """Return expired leases to pending; mark items past the attempt limit dead."""
    from producer.reconciler import reconcile as do_reconcile

    s = ctx.services()
    got = do_reconcile(s.db_url(), max_attempts=s.max_attempts, task=task_name)
    click.echo(
        json.dumps(got) if as_json else f"returned {got['returned']} to pending, {got['dead']} dead"
    )


@click.command("retry")
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["failed", "dead", "parked"]),
    multiple=True,
    required=True,
    help="Which items to put back; repeat for several.",
)
@click.option("--task", "-t", "task_name", help="Only this task.")
@pass_fleet
def retry_cmd(ctx: FleetContext, statuses: tuple[str, ...], task_name: str | None) -> None:
    """Put failed, dead or parked items back to pending, with fresh attempt counts."""
    from db import ledger
    from db.engine import transaction

    with transaction(ctx.url()) as session:
        n = ledger.retry(session, statuses=statuses, task=task_name)
    click.echo(f"{n} item(s) back to pending: `fleet run --task T` (or `fleet enqueue`) sends them")


@click.command("park")
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["failed", "dead"]),
    multiple=True,
    required=True,
    help="Which items to park; repeat for both.",
)
@click.option("--task", "-t", "task_name", help="Only this task.")
@click.option(
    "--item",
    "item_ids",
    type=click.IntRange(min=1),
    multiple=True,
    help="Only this work item id (`fleet results --status failed --json` shows them); repeat.",
)
@pass_fleet
def park_cmd(
    ctx: FleetContext, statuses: tuple[str, ...], task_name: str | None, item_ids: tuple[int, ...]
) -> None:
    """Acknowledge failed or dead items that will never succeed (status parked).

    A parked item keeps its reason, is not run again and is not failed work to
    act on (status, metrics and run summaries show it as parked). `fleet retry
    --status parked` puts parked items back.
    """
    from db import ledger
    from db.engine import transaction

    if task_name is not None:
        ctx.task(task_name)
    with transaction(ctx.url()) as session:
        n = ledger.park(session, statuses=statuses, task=task_name, item_ids=item_ids)
    click.echo(f"{n} item(s) parked: `fleet retry --status parked` puts them back")
