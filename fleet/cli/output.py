"""The options several `fleet` commands share, and how a run's outcome is printed."""

from __future__ import annotations

import json
import sys
from typing import Protocol

import click

from config.exitcodes import ExitCode

task_option = click.option(
    "--task", "-t", "task_name", required=True, help="Task name from the task config (e.g. intent)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
local_workers_option = click.option(
    "--local-workers/--no-local-workers",
    default=None,
    help="Start, supervise and stop the workers this run needs on this machine: one per task "
    "per GPU, or per task on the CPU; one task at a time when memory is short. "
    "Default: FLEET_LOCAL_WORKERS (auto: on with the embedded servers).",
)


class RunSummary(Protocol):
    """What `finish_run` reads of a driven run's report (producer's run report)."""

    @property
    def run_id(self) -> int | None: ...

    @property
    def counts(self) -> dict[str, dict[str, int]]: ...

    @property
    def work(self) -> dict[str, dict[str, int]]: ...

    @property
    def seconds(self) -> float: ...

    @property
    def timed_out(self) -> bool: ...


def _bad(counts: dict[str, dict[str, int]]) -> int:
    return sum(c.get("failed", 0) + c.get("dead", 0) for c in counts.values())


def finish_run(report: RunSummary, as_json: bool) -> None:
    """Print a finished run (`fleet run`, `fleet nightly`) and exit with its code.

    `report.work`: the run's own work, {task: {status: items}} of the items
    whose state changed during it (falls back to `report.counts`, the ledger,
    when it could not be counted); seconds: the run's wall time. The exit
    status reflects this run only: returns when its items are done; exits
    TIMEOUT when it timed out with work unfinished, CONFIG when a declared
    source could not be synced first (`failed_sources`, when the report has
    it), FAILED_ITEMS when items ended failed or dead in this run. Failed or
    dead items from earlier runs are mentioned, not counted.
    """
    work = report.work or report.counts
    bad = _bad(work)
    older = max(_bad(report.counts) - bad, 0) if report.work else 0
    sync_failed: dict[str, str] = getattr(report, "failed_sources", {})
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": report.run_id,
                    "counts": work,
                    "ledger": report.counts,
                    "seconds": round(report.seconds, 2),
                    "timed_out": report.timed_out,
                    "sync_failed": sync_failed,
                }
            )
        )
    else:
        from fleet.observe.display import counts_table

        counts_table(work)
        click.echo(f"run {report.run_id} took {report.seconds:.1f}s")
        if older:
            click.echo(
                f"{older} older failed or dead item(s) from earlier runs were not taken up "
                "(`fleet results --status failed`); `fleet retry` puts them back, "
                "`fleet park` acknowledges those that will never succeed",
                err=True,
            )
    if report.timed_out:
        if not as_json:
            click.echo(
                "timed out with work unfinished: are workers running? (`fleet worker --task T`)",
                err=True,
            )
        sys.exit(int(ExitCode.TIMEOUT))
    if sync_failed:
        if not as_json:
            for name, why in sync_failed.items():
                click.echo(f"source {name} not synced: {why}", err=True)
            click.echo(
                "the run used what the fleet already had of them; fix the source and "
                "`fleet sync` (exit 2)",
                err=True,
            )
        sys.exit(int(ExitCode.CONFIG))
    if bad:
        if not as_json:
            click.echo(
                f"{bad} item(s) failed or dead in this run: see `fleet results --status failed`; "
                "`fleet retry --status failed` puts them back",
                err=True,
            )
        sys.exit(int(ExitCode.FAILED_ITEMS))
