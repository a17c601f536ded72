"""The `fleet` command: a thin front door over producer/, workers/ and db/.

Exit codes: 0 ok; 1 the work finished with failed or dead items (`run`,
`demo`); 2 bad usage or configuration; 3 a service (Postgres, Redis) is
unreachable or not migrated; 4 `run` timed out with work unfinished.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from fleet.config.settings import Settings, redact
from fleet.ops.workercommand import worker_argv, worker_env, worker_name

EXIT_FAILED_ITEMS, EXIT_CONFIG, EXIT_SERVICE, EXIT_TIMEOUT = 1, 2, 3, 4


class Ctx:
    """Settings read once; services resolved only by the commands that need them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = False
        self._app: Any = None

    def services(self) -> Settings:
        if not self._ready:
            from fleet.ops.services import SchemaNotReady, check_schema, ensure_services

            try:
                self.settings = ensure_services(self.settings)
                check_schema(self.settings.db_url())
            except SchemaNotReady as e:
                fail(str(e), EXIT_SERVICE)
            except Exception as e:
                if isinstance(e, click.ClickException):
                    raise
                fail(
                    f"cannot reach the database ({type(e).__name__}: {str(e).splitlines()[0]}). "
                    f"Check DATABASE_URL ({redact(self.settings.db_url()) if self.settings.database_url else 'embedded'}) "
                    "and that Postgres is running.",
                    EXIT_SERVICE,
                )
            self._ready = True
        return self.settings

    def url(self) -> str:
        return self.services().db_url()

    def app(self) -> Any:
        """One Celery app per command. Its broker connections are closed at exit
        (atexit runs this before the embedded Redis' own check, which only stops
        the server when no client is left connected)."""
        if self._app is None:
            import atexit

            from workers.app import create_app

            self._app = create_app(self.services())
            atexit.register(self._app.pool.force_close_all)
        return self._app

    def tasks(self) -> Any:
        from fleet.config.taskconfig import ConfigError, load_tasks

        try:
            return load_tasks(self.settings.config_file)
        except ConfigError as e:
            fail(str(e), EXIT_CONFIG)

    def task(self, name: str) -> Any:
        from fleet.config.taskconfig import ConfigError, get_task

        try:
            return get_task(self.tasks(), name)
        except ConfigError as e:
            fail(str(e), EXIT_CONFIG)


class FleetError(click.ClickException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click declares it on the class


def fail(message: str, code: int = EXIT_CONFIG) -> Any:
    raise FleetError(message, code)


pass_ctx = click.make_pass_decorator(Ctx)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpu-fleet")
@click.pass_context
def main(click_ctx: click.Context) -> None:
    """Classify a Postgres backlog of conversations and audio with a Celery GPU fleet.

    With DATABASE_URL and BROKER_URL unset, an embedded Postgres and Redis are
    started under FLEET_STATE_DIR. `fleet demo` runs the whole job once.
    """
    from pydantic import ValidationError

    from fleet.config.logs import setup_logging

    try:
        settings = Settings()
    except ValidationError as e:
        fail(f"invalid settings: {e}", EXIT_CONFIG)
    setup_logging(
        settings.log_level if settings.log_level != "INFO" else "WARNING",
        json_lines=settings.log_json,
    )
    click_ctx.obj = Ctx(settings)


# -- settings and schema -------------------------------------------------------


@main.command("settings")
@json_option
@pass_ctx
def settings_cmd(ctx: Ctx, as_json: bool) -> None:
    """Show the settings in force (secrets masked) and where each comes from."""
    s = ctx.settings
    out: dict[str, Any] = {}
    for name in type(s).model_fields:
        value = getattr(s, name)
        if name in ("database_url", "broker_url"):
            value = redact(value.get_secret_value()) if value is not None else "(embedded)"
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


@main.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--down", is_flag=True, help="Downgrade to --revision (default base) instead.")
@pass_ctx
def migrate(ctx: Ctx, revision: str, down: bool) -> None:
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


# -- ingest -----------------------------------------------------------------------


@main.group()
def ingest() -> None:
    """Put conversations or audio files into Postgres (idempotent on external_id)."""


@ingest.command("conversations")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_ctx
def ingest_conversations_cmd(ctx: Ctx, path: Path, as_json: bool) -> None:
    """Ingest a JSONL file: one {"external_id", "messages": [{role, content}], ...} per line."""
    from fleet.observe.display import byte_progress
    from fleet.ops.ingest import ingest_conversations_file

    url = ctx.url()
    with (
        path.open("rb") as f,
        byte_progress(path.stat().st_size, f"ingest {path.name}", quiet=as_json) as advance,
    ):
        report = ingest_conversations_file(url, f, progress=advance)
    _print_ingest(report, as_json)


@ingest.command("audio")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
@pass_ctx
def ingest_audio_cmd(ctx: Ctx, folder: Path, as_json: bool) -> None:
    """Register the audio files (wav, flac, ogg, mp3) under FOLDER, inside the audio root."""
    from fleet.ops.ingest import ingest_audio_dir

    s = ctx.services()
    try:
        report = ingest_audio_dir(s.db_url(), folder, audio_root=s.resolved_audio_root)
    except ValueError as e:
        fail(str(e), EXIT_CONFIG)
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


# -- backlog, enqueue, run ------------------------------------------------------------


@main.command()
@json_option
@pass_ctx
def backlog(ctx: Ctx, as_json: bool) -> None:
    """Work items per task and status."""
    from db import ledger
    from db.engine import transaction
    from fleet.observe.display import counts_table

    with transaction(ctx.url()) as session:
        counts = ledger.counts(session)
    if as_json:
        click.echo(json.dumps(counts))
    elif not counts:
        click.echo("no work items yet: `fleet ingest ...` then `fleet enqueue --task T`")
    else:
        counts_table(counts)


@main.command()
@task_option
@click.option("--limit", type=click.IntRange(min=1), help="Most items to claim and send.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Items per batch (default FLEET_BATCH_SIZE)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be sent; claim nothing.")
@json_option
@pass_ctx
def enqueue(
    ctx: Ctx,
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


@main.command()
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
@pass_ctx
def run(
    ctx: Ctx,
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
    from fleet.observe.display import run_progress
    from fleet.ops.localworkers import LocalWorkersFailed, maybe_local_workers, wanted
    from producer.runner import run_until_done

    local = wanted(local_workers, ctx.settings)  # before services() fills in the URLs
    specs = [ctx.task(n) for n in task_names]
    if with_follow_ups:
        for spec in list(specs):
            specs += [ctx.task(t) for t in spec.then if t not in [s.name for s in specs]]
    s = ctx.services()
    try:
        with (
            maybe_local_workers(specs, s, enabled=local) as lw,
            run_progress(
                [sp.name for sp in specs], quiet=as_json, workers=lw.notes if lw else None
            ) as update,
        ):
            report = run_until_done(
                s.db_url(),
                ctx.app(),
                specs,
                s,
                trigger=trigger,
                timeout=timeout,
                progress=lw.wrap(update) if lw else update,
                gate=lw.gate if lw else None,
            )
    except LocalWorkersFailed as e:
        fail(str(e), EXIT_CONFIG)
    _finish_run(report, as_json)


def _finish_run(report: Any, as_json: bool) -> None:
    bad = sum(c.get("failed", 0) + c.get("dead", 0) for c in report.counts.values())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": report.run_id,
                    "counts": report.counts,
                    "seconds": round(report.seconds, 2),
                    "timed_out": report.timed_out,
                }
            )
        )
    else:
        from fleet.observe.display import counts_table

        counts_table(report.counts)
        click.echo(f"run {report.run_id} took {report.seconds:.1f}s")
    if report.timed_out:
        if not as_json:
            click.echo(
                "timed out with work unfinished: are workers running? (`fleet worker --task T`)",
                err=True,
            )
        sys.exit(EXIT_TIMEOUT)
    if bad:
        if not as_json:
            click.echo(
                f"{bad} item(s) failed or dead: see `fleet results --status failed`; "
                "`fleet retry --status failed` puts them back",
                err=True,
            )
        sys.exit(EXIT_FAILED_ITEMS)


@main.command()
@click.option("--task", "-t", "task_name", help="Only this task.")
@json_option
@pass_ctx
def reconcile(ctx: Ctx, task_name: str | None, as_json: bool) -> None:
    """Return expired leases to pending; mark items past the attempt limit dead."""
    from producer.reconciler import reconcile as do_reconcile

    s = ctx.services()
    got = do_reconcile(s.db_url(), max_attempts=s.max_attempts, task=task_name)
    click.echo(
        json.dumps(got) if as_json else f"returned {got['returned']} to pending, {got['dead']} dead"
    )


@main.command()
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["failed", "dead"]),
    multiple=True,
    required=True,
    help="Which items to put back; repeat for both.",
)
@click.option("--task", "-t", "task_name", help="Only this task.")
@pass_ctx
def retry(ctx: Ctx, statuses: tuple[str, ...], task_name: str | None) -> None:
    """Put failed or dead items back to pending, with fresh attempt counts."""
    from db import ledger
    from db.engine import transaction

    with transaction(ctx.url()) as session:
        n = ledger.retry(session, statuses=statuses, task=task_name)
    click.echo(f"{n} item(s) back to pending: `fleet run --task T` (or `fleet enqueue`) sends them")


@main.command()
@task_option
@click.option(
    "--status",
    type=click.Choice(["done", "failed", "dead", "all"]),
    default="all",
    show_default=True,
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_ctx
def results(ctx: Ctx, task_name: str, status: str, limit: int, as_json: bool) -> None:
    """Show a task's results (label, confidence, model, tier) or errors."""
    from fleet.observe.display import results_table
    from fleet.reporting.queries import fetch_results

    rows = fetch_results(ctx.url(), task=task_name, status=status, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, default=str))
    else:
        results_table(rows, title=f"{task_name}: {status}")


@main.command()
@task_option
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "--status",
    type=click.Choice(["done", "failed", "dead", "all"]),
    default="all",
    show_default=True,
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: stdout).",
)
@click.option("--individual", is_flag=True, help="One JSON file per item in --output-dir.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for --individual.",
)
@pass_ctx
def export(
    ctx: Ctx,
    task_name: str,
    fmt: str,
    status: str,
    output: Path | None,
    individual: bool,
    output_dir: Path | None,
) -> None:
    """Export a task's results (streamed) as JSONL or CSV, or one file per item."""
    from fleet.reporting.export import export as do_export

    if individual and output_dir is None:
        fail("--individual needs --output-dir DIR", EXIT_CONFIG)
    url = ctx.url()
    if individual:
        n = do_export(
            url, task=task_name, fmt=fmt, out=None, status=status, individual_dir=output_dir
        )
        click.echo(f"wrote {n} files to {output_dir}", err=True)
        return
    if output is None:
        n = do_export(url, task=task_name, fmt=fmt, out=sys.stdout, status=status)
    else:
        with output.open("w", newline="") as f:
            n = do_export(url, task=task_name, fmt=fmt, out=f, status=status)
    click.echo(f"exported {n} items", err=True)


@main.command("eval")
@task_option
@click.option(
    "--gold",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help='JSONL of {"external_id", "label"}.',
)
@json_option
@pass_ctx
def eval_cmd(ctx: Ctx, task_name: str, gold: Path, as_json: bool) -> None:
    """Score a task's stored results against gold labels: accuracy, macro-F1, confusion, latency."""
    from fleet.observe.display import confusion_table
    from fleet.reporting.export import evaluate, load_gold

    try:
        labels = load_gold(gold)
    except ValueError as e:
        fail(str(e), EXIT_CONFIG)
    report = evaluate(ctx.url(), task=task_name, gold=labels)
    if as_json:
        click.echo(json.dumps(report))
        return
    confusion_table(report["confusion"])
    lat = report["latency_ms"]
    click.echo(
        f"accuracy {report['accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  n={report['n']}  "
        f"latency/item mean {lat['mean']:.1f} ms p50 {lat['p50']:.1f} p95 {lat['p95']:.1f}"
    )
    if report["not_in_task"] or report["not_done"]:
        click.echo(
            f"{report['not_in_task']} gold items have no work item; {report['not_done']} are not done",
            err=True,
        )


@main.command()
@task_option
@click.option(
    "--models",
    nargs=2,
    required=True,
    metavar="A B",
    help="Two model folders (or names under FLEET_MODELS_DIR).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Items to run both on.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("compare.jsonl"),
    show_default=True,
    help="Side-by-side answers, one line per item.",
)
@json_option
@pass_ctx
def compare(
    ctx: Ctx, task_name: str, models: tuple[str, str], limit: int, output: Path, as_json: bool
) -> None:
    """Shadow run: two models on the same items; the disagreement rate and where they differ."""
    from fleet.reporting.compare import compare as do_compare

    spec = ctx.task(task_name)
    report = do_compare(ctx.services(), spec, models[0], models[1], limit=limit, out_path=output)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"{report['n']} items: disagreement {report['disagreement_rate']:.1%}; side by side in {report['file']}"
    )
    for d in report["top_disagreements"]:
        click.echo(f"  A={d['a']}  B={d['b']}  x{d['count']}")


# -- workers ---------------------------------------------------------------------


@main.command()
@task_option
@click.option(
    "--gpu",
    type=click.IntRange(min=0),
    help="Pin to this GPU index (CUDA_VISIBLE_DEVICES). Unset: CPU.",
)
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def worker(ctx: Ctx, task_name: str, gpu: int | None, loglevel: str) -> None:
    """Start one solo-pool Celery worker for a task, holding its model resident."""
    ctx.task(task_name)  # fail here, with the list of tasks, on a typo
    # The worker replaces this process: its pid names it.
    name = worker_name(task_name, gpu=gpu, unique=str(os.getpid()))
    argv = worker_argv(task_name, gpu=gpu, loglevel=loglevel, hostname=name)
    os.execvpe(argv[0], argv, worker_env(ctx.settings, gpu=gpu))


@main.command()
@task_option
@click.option(
    "--gpus",
    default="all",
    show_default=True,
    help="'all' visible GPUs, or indexes like 0,1,3 (indexes this host lacks run as CPU stand-ins).",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each worker's log to DIR/<task>-gpuN.log instead of this terminal.",
)
@pass_ctx
def workers(ctx: Ctx, task_name: str, gpus: str, loglevel: str, log_dir: Path | None) -> None:
    """Start and supervise one pinned worker per GPU; restart any that dies, with backoff."""
    from fleet.ops.supervisor import parse_gpus, supervise, visible_gpus

    ctx.task(task_name)
    try:
        indexes = parse_gpus(gpus, available=visible_gpus())
    except ValueError as e:
        fail(str(e), EXIT_CONFIG)
    sys.exit(
        supervise(
            task_name, indexes, ctx.settings, loglevel=loglevel, log_dir=log_dir, echo=click.echo
        )
    )


# -- models, train, demo -----------------------------------------------------------------


@main.group()
def models() -> None:
    """Prepare the bundled models (convert, train) into FLEET_MODELS_DIR."""


@models.command("prepare")
@click.option(
    "--only",
    multiple=True,
    help="Prepare only these (intent-minilm, worthiness-minilm, sentiment-minilm, whisper-tiny.en, smollm2-135m-instruct, all-minilm-l6-v2; gemma3-270m only when named).",
)
@click.option("--force", is_flag=True, help="Rebuild even if present.")
@pass_ctx
def models_prepare(ctx: Ctx, only: tuple[str, ...], force: bool) -> None:
    """Build every bundled model folder once (seconds to a few minutes on CPU)."""
    from fleet.models.prepare import prepare_models

    for name, path, seconds in prepare_models(
        ctx.settings.resolved_models_dir, only=only, force=force, echo=click.echo
    ):
        click.echo(f"{name:24} {path}  ({seconds:.1f}s)")


_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command()
@task_option
@click.option("--data", type=_file, help="Labeled CSV/JSONL/JSON: text,label[,weight|confidence].")
@click.option("--from-task", help="Train on this task's stored results (e.g. llm_classify).")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="With --from-task: keep results at least this confident.",
)
@click.option(
    "--confirmed",
    type=_file,
    help='With --from-task: only items a reviewer confirmed ({"external_id","label"} lines).',
)
@click.option(
    "--base", help="Encoder to start from: a local folder or a cached hub id (default: MiniLM)."
)
@click.option(
    "--eval", "eval_file", type=_file, help="Validation file (default: a split of --data)."
)
@click.option(
    "--test", "test_file", type=_file, help="Independent test file, scored once at the end."
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.05, 0.5),
    default=0.2,
    show_default=True,
    help="Share of each label held out for validation when there is no --eval.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Model folder to write."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Most epochs (early stopping may end sooner)."
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step.")
@click.option(
    "--patience", type=click.IntRange(min=1), help="Epochs without improvement before stopping."
)
@click.option("--max-length", type=click.IntRange(min=8), help="Tokens per example.")
@click.option(
    "--class-weights",
    type=click.Choice(["balanced", "none"]),
    default="balanced",
    show_default=True,
    help="Weigh rare labels up (n / (k * count)).",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seeds the split, the head and the batches."
)
@json_option
@pass_ctx
def train(
    ctx: Ctx,
    task_name: str,
    data: Path | None,
    from_task: str | None,
    min_confidence: float,
    confirmed: Path | None,
    base: str | None,
    eval_file: Path | None,
    test_file: Path | None,
    test_fraction: float,
    out: Path | None,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    patience: int | None,
    max_length: int | None,
    class_weights: str,
    seed: int,
    as_json: bool,
) -> None:
    """Fine-tune an encoder for a sequence_classify task from a labeled file, stored results or the bundled set.

    Writes a model folder (safetensors, tokenizer, training_metrics.json, a model
    card) and prints the TOML lines that serve it.
    """
    from fleet.models.finetune import TrainConfig
    from fleet.models.labeled import TrainingDataError
    from fleet.models.training import Chosen, choose_examples, run_training

    spec = ctx.task(task_name)
    if from_task:
        ctx.task(from_task)
    try:
        chosen: Chosen = choose_examples(
            task_name,
            data=data,
            from_task=from_task,
            min_confidence=min_confidence,
            confirmed=confirmed,
            db_url=ctx.url,
            models_dir=ctx.settings.resolved_models_dir,
        )
        out = out or chosen.out
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "patience": patience,
                "max_length": max_length,
            }.items()
            if v is not None
        }
        config = TrainConfig(seed=seed, class_weighting=class_weights, **overrides)
        metrics = run_training(
            spec,
            models_dir=ctx.settings.resolved_models_dir,
            examples=chosen.examples,
            data_name=chosen.data_name,
            out=out,
            base=base,
            eval_file=eval_file,
            test_file=test_file or chosen.test_file,
            config=config,
            test_fraction=test_fraction,
            quiet=as_json,
            extra=chosen.extra,
        )
    except (TrainingDataError, ValueError) as e:
        fail(f"{e}", EXIT_CONFIG)
    except OSError as e:
        if base is None:
            raise
        fail(
            f"cannot load the base model {base!r}: {e}. Give a local folder with config.json, "
            "weights and a tokenizer (hub ids load from the local cache only)",
            EXIT_CONFIG,
        )
    if as_json:
        click.echo(json.dumps({**metrics, "folder": str(out)}))
        return
    val = metrics["validation_scores"]
    click.echo(
        f"{out}: {metrics['n_train']} examples, {metrics['epochs_run']} epochs (best "
        f"{metrics['best_epoch']}); validation accuracy {val['accuracy']:.3f}, "
        f"macro-F1 {val['macro_f1']:.3f} (n={val['n']})"
    )
    if metrics.get("test"):
        t = metrics["test"]
        click.echo(
            f"independent test accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f} (n={t['n']})"
        )
    click.echo("serve it: add to the task config, at the top of the ladder:\n" + metrics["toml"])


@main.command()
@click.option(
    "--conversations",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL to classify instead of the bundled samples.",
)
@click.option("--timeout", type=float, default=900, show_default=True)
@pass_ctx
def demo(ctx: Ctx, conversations: Path | None, timeout: float) -> None:
    """Run the whole job once: prepare models, ingest samples, start a worker, classify, show results."""
    from fleet.demo import run_demo

    sys.exit(run_demo(ctx, conversations=conversations, timeout=timeout))


@main.command()
@click.option("--run", "run_id", type=click.IntRange(min=1), help="Report on this run (its id).")
@click.option("--since", help="Window start: 2026-01-05, 2026-01-05T22:00, today, or 24h / 7d ago.")
@click.option("--until", help="Window end (with --since; default now).")
@click.option("--task", "-t", "task_names", multiple=True, help="Only this task; repeat.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="HTML file to write (one page, nothing external).",
)
@pass_ctx
def report(
    ctx: Ctx,
    run_id: int | None,
    since: str | None,
    until: str | None,
    task_names: tuple[str, ...],
    out: Path,
) -> None:
    """Write one self-contained HTML page: throughput, labels, tiers, failures, summary."""
    from fleet.reporting.html import ReportError, fmt_duration, write_report

    try:
        data = write_report(
            ctx.url(), out, run_id=run_id, since=since, until=until, tasks=task_names
        )
    except ReportError as e:
        fail(str(e), EXIT_CONFIG)
    t = data.total
    click.echo(
        f"wrote {out}: {t.items} items (done {t.done}, failed {t.failed}, dead {t.dead}) "
        f"over {fmt_duration(data.duration_s)}"
    )


@main.command()
@click.option("--task", "-t", "task_name", help="Only this task.")
@json_option
@pass_ctx
def status(ctx: Ctx, task_name: str | None, as_json: bool) -> None:
    """Per task: items by status, items/s, ETA, queue length; live workers; the latest run."""
    from fleet.observe.statusview import show_status

    if task_name:
        ctx.task(task_name)
    sys.exit(show_status(ctx.services(), only=task_name, as_json=as_json))


@main.command()
@click.option("--task", "-t", "task_name", help="Only this task.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="Seconds."
)
@click.option("--until-done", is_flag=True, help="Exit 0 once nothing is pending/queued/running.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@pass_ctx
def watch(
    ctx: Ctx, task_name: str | None, interval: float, until_done: bool, timeout: float | None
) -> None:
    """Live progress bars per task and the workers' state, refreshed in place (Ctrl-C stops)."""
    from fleet.observe.statusview import run_watch

    if task_name:
        ctx.task(task_name)
    s = ctx.services()
    sys.exit(
        run_watch(s, only=task_name, interval=interval, until_done=until_done, timeout=timeout)
    )


@main.command()
@click.option("--address", help="Listen address (default FLEET_METRICS_ADDRESS).")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port (default FLEET_METRICS_PORT; 0: any free)."
)
@pass_ctx
def metrics(ctx: Ctx, address: str | None, port: int | None) -> None:
    """Serve Prometheus metrics: backlog, queue lengths, items/s, per-worker stats."""
    from fleet.observe.prometheus import run_exporter

    s = ctx.services()
    sys.exit(run_exporter(s, address=address, port=port, echo=lambda m: click.echo(m, err=True)))


@main.command()
@click.option(
    "--task", "-t", "task_names", multiple=True, help="Only these tasks (default: every one)."
)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 4).")
@local_workers_option
@json_option
@pass_ctx
def nightly(
    ctx: Ctx,
    task_names: tuple[str, ...],
    timeout: float | None,
    local_workers: bool | None,
    as_json: bool,
) -> None:
    """Run the nightly job once in the foreground (cron, Kubernetes CronJob).

    Discovers and runs every configured task, records a `runs` row (trigger
    nightly). A nightly run still going elsewhere: says which, exits 0. With
    --local-workers, one command on one machine starts the workers it needs.
    """
    from fleet.beat import nightly_command

    nightly_command(ctx, task_names, timeout=timeout, as_json=as_json, local_workers=local_workers)


@main.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def beat(ctx: Ctx, loglevel: str) -> None:
    """Run the schedule: Celery beat plus a control worker on fleet.control (no model).

    Nightly on FLEET_NIGHTLY_CRONTAB (FLEET_TIMEZONE), a feed tick every
    FLEET_BEAT_FEED_SECONDS, the reconciler every FLEET_BEAT_RECONCILE_SECONDS.
    """
    from fleet.beat import beat_command

    sys.exit(beat_command(ctx, loglevel=loglevel))


@main.command()
@click.option("--address", help="Listen address (default FLEET_FLOWER_ADDRESS).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default FLEET_FLOWER_PORT).")
@click.option("--no-auth", is_flag=True, help="Serve without a password (warns).")
@pass_ctx
def flower(ctx: Ctx, address: str | None, port: int | None, no_auth: bool) -> None:
    """Watch the fleet in Flower on its broker, behind basic auth (FLEET_FLOWER_*)."""
    from fleet.flower import run_flower

    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    sys.exit(run_flower(ctx, address=address, port=port, no_auth=no_auth, echo=echo))


@main.group()
def deploy() -> None:
    """Generate deployment manifests from the task config (see deploy/README.md)."""


@deploy.command("compose")
@click.option("--gpus", required=True, help="This host's GPU indexes, e.g. 0,1,2,3 (or 'all').")
@click.option(
    "--task", "-t", "task_options", multiple=True, help="Task, or TASK=0,1 to pin GPUs; repeat."
)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@pass_ctx
def deploy_compose(ctx: Ctx, gpus: str, task_options: tuple[str, ...], out: Path | None) -> None:
    """One worker service per GPU (docker-compose.override.yml); default task: intent."""
    from fleet.ops.deploy import compose_command

    try:
        text, plan = compose_command(ctx.tasks(), gpus, task_options)
    except ValueError as e:  # fleet.ops.deploy.DeployError is one
        fail(str(e), EXIT_CONFIG)
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    click.echo(f"wrote {out}: {len(plan)} worker(s); start them with `docker compose up -d`")


@deploy.command("k8s")
@task_option
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--list-length",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="KEDA target: batches waiting per worker.",
)
@pass_ctx
def deploy_k8s(ctx: Ctx, task_name: str, max_replicas: int, list_length: int) -> None:
    """A task's worker Deployment (one GPU per pod) and its KEDA ScaledObject, as YAML."""
    from fleet.ops.deploy import k8s_command

    spec = ctx.task(task_name)
    click.echo(k8s_command(spec, max_replicas=max_replicas, list_length=list_length), nl=False)


# fleet sync, fleet rerun, fleet models pull (fleet/synccli.py)
from fleet.synccli import register as _register_sync  # noqa: E402

_register_sync(main, models)


if __name__ == "__main__":
    main()
