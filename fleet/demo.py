"""`fleet demo`: the whole nightly job once, on one machine.

Prepares the bundled models, ingests the sample conversations, starts one
worker per task as a real `celery worker` subprocess, drives the run with a
progress bar, prints the results and stops the workers.
"""

from __future__ import annotations

import signal
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

import click

from fleet.display import results_table


def _start_worker(ctx: Any, task: str, logs: Path) -> tuple[subprocess.Popen[bytes], Path]:
    from fleet.cli import worker_argv, worker_env

    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"worker-{task}.log"
    proc = subprocess.Popen(
        worker_argv(task, gpu=None, loglevel="INFO", hostname=f"{task}@demo.%h"),
        env=worker_env(ctx.settings, gpu=None),
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log_path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(ctx: Any, *, conversations: Path | None, timeout: float) -> int:
    from fleet.display import byte_progress, run_progress
    from fleet.ingest import ingest_conversations_file
    from fleet.models import prepare_intent
    from fleet.queries import fetch_results
    from producer.runner import run_until_done

    t0 = time.monotonic()
    s = ctx.services()
    click.echo(f"services: {'embedded under ' + str(s.state_dir) if ctx.settings.embedded else 'DATABASE_URL / BROKER_URL'}")
    prepare_intent(s.resolved_models_dir, echo=click.echo)
    spec = ctx.task("intent")

    path = conversations or Path(str(resources.files("fleet").joinpath("data/sample_conversations.jsonl")))
    with path.open("rb") as f, byte_progress(path.stat().st_size, "ingest") as advance:
        report = ingest_conversations_file(s.db_url(), f, progress=advance)
    click.echo(f"ingested {report.inserted} conversations ({report.already_present} already there, {len(report.bad)} bad lines)")

    proc, log_path = _start_worker(ctx, spec.name, s.state_dir / "logs")
    try:
        with run_progress([spec.name]) as update:
            run = run_until_done(s.db_url(), ctx.app(), [spec], s, trigger="demo", timeout=timeout, progress=update)
        if proc.poll() is not None:
            click.echo(f"the worker exited early (code {proc.returncode}); its log: {log_path}", err=True)
    finally:
        _stop(proc)

    rows = fetch_results(s.db_url(), task=spec.name, limit=None)
    golds = [(r, (r.get("conversation_meta") or {}).get("gold_intent")) for r in rows]
    results_table([r for r, _ in golds][:60], title=f"{spec.name} results")
    scored = [(r["label"], g) for r, g in golds if g and r["status"] == "done"]
    if scored:
        acc = sum(a == b for a, b in scored) / len(scored)
        click.echo(f"agreement with the samples' gold intent: {acc:.1%} of {len(scored)}")
    counts = run.counts.get(spec.name, {})
    click.echo(
        f"done {counts.get('done', 0)}, failed {counts.get('failed', 0)}, dead {counts.get('dead', 0)}; "
        f"demo took {time.monotonic() - t0:.1f}s. Worker log: {log_path}"
    )
    if run.timed_out:
        click.echo(f"timed out; see the worker log {log_path}", err=True)
        return 4
    return 0
