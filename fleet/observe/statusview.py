"""How `fleet status` and `fleet watch` show a `fleet.observe.status.FleetStatus`:
tables for a one-off look, progress bars per task that refresh in place
(rich.live) for watching a run. Nothing here queries; `fleet.observe.status` does."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from config.exitcodes import ExitCode
from config.settings import Settings, redact
from db.schema import STATUSES
from fleet.observe.cascade import configured_cascades
from fleet.observe.status import (
    FleetStatus,
    LedgerRead,
    TaskStatus,
    collect,
    configured_tasks,
    read_ledger,
)
from wire.stats import redis_client


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"


def fmt_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_queue(n: int | None) -> str:
    return "?" if n is None else str(n)


def fmt_eta(t: TaskStatus) -> str:
    if t.total == 0:
        return "-"
    return "done" if t.remaining == 0 else fmt_duration(t.eta_seconds)


def shown_tasks(st: FleetStatus) -> tuple[list[TaskStatus], list[str]]:
    """Tasks worth a row (work items, workers or queued messages), and the idle rest."""
    shown, idle = [], []
    for name, t in st.tasks.items():
        if t.total or t.workers or t.queue_length or len(st.tasks) == 1:
            shown.append(t)
        else:
            idle.append(name)
    return shown, idle


def tasks_table(st: FleetStatus) -> Table | Text:
    shown, idle = shown_tasks(st)
    if not shown:
        return Text("no work items yet: `fleet ingest ...`, then `fleet run --task T`")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left")
    table.add_column("task", no_wrap=True)
    for s in STATUSES:
        table.add_column(s, justify="right")
    for col in ("items/s", "ETA", "queue", "workers"):
        table.add_column(col, justify="right")
    for t in shown:
        table.add_row(
            t.task,
            *[str(t.counts.get(s, 0)) for s in STATUSES],
            fmt_rate(t.items_per_second),
            fmt_eta(t),
            fmt_queue(t.queue_length),
            str(t.workers),
        )
    if idle:
        table.caption = f"no work items: {', '.join(idle)}"
    return table


def workers_table(st: FleetStatus) -> Table | Text:
    if not st.workers:
        return Text("no live workers (start one: `fleet worker --task T`)", style="yellow")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("worker", overflow="fold")
    table.add_column("task")
    table.add_column("tier model", overflow="fold")
    table.add_column("gpu", overflow="fold")
    for col in ("batches", "done", "failed", "OOMs", "down", "GPU mem", "seen"):
        table.add_column(col, justify="right")
    for w in st.workers:
        table.add_row(
            w.worker,
            w.task,
            f"{w.tier} {w.model}",
            w.gpu if w.gpu == "cpu" else f"{w.gpu} {w.device_name}",
            str(w.batches),
            str(w.items_done),
            str(w.items_failed),
            str(w.ooms),
            str(w.downshifts),
            fmt_bytes(w.gpu_memory_allocated),
            f"{fmt_duration(st.last_seen(w))} ago",
        )
    return table


def run_line(st: FleetStatus) -> Text:
    run = st.latest_run
    if run is None:
        return Text("no runs yet (`fleet run --task T`)", style="dim")
    started = run.started_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if run.finished_at is None:
        took = f"running for {fmt_duration(st.taken_at - run.started_at.timestamp())}"
    else:
        took = f"took {fmt_duration((run.finished_at - run.started_at).total_seconds())}"
        if run.counts.get("timed_out"):
            took += ", timed out"
    return Text(f"latest run #{run.id} ({run.trigger}, {run.task}): started {started}, {took}")


def sources_text(st: FleetStatus) -> Text:
    """One line per synced source: its lag, and every row it could not take as it is."""
    lines = []
    for name, src in st.sources.items():
        when = (
            "never synced"
            if src.lag_seconds is None
            else f"synced {fmt_duration(src.lag_seconds)} ago"
        )
        parts = [f"source {name}: {when}"]
        if src.undiscovered:
            parts.append(f"{src.undiscovered:,} rows not discovered yet (`fleet run` / nightly)")
        if src.refused or src.noted:
            parts.append(f"{src.refused:,} rows refused, {src.noted:,} with a note (sync_problems)")
        if src.withheld:
            parts.append(f"{src.withheld:,} deletes withheld (`fleet sync --allow-mass-delete`)")
        if src.last_error:
            parts.append(f"last pass FAILED: {src.last_error}")
        lines.append("; ".join(parts))
    bad = any(s.refused or s.last_error or s.withheld for s in st.sources.values())
    return Text("\n".join(lines), style="yellow" if bad else "")


def errors_text(st: FleetStatus) -> Text:
    lines = [f"{source} unreadable: {msg}" for source, msg in st.errors.items()]
    age = st.ledger_age
    if "database" in st.errors and age is not None and age > 0:  # `fleet watch` keeps the last
        lines.append(f"ledger figures shown are from {age:.0f} s ago")
    return Text("\n".join(lines), style="bold red")


def header(services: str, st: FleetStatus) -> Text:
    when = dt.datetime.fromtimestamp(st.taken_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Text(f"{services}\n{when}, rates over the last {st.window_seconds:g} s", style="dim")


def status_view(st: FleetStatus, services: str) -> Group:
    parts: list[RenderableType] = [header(services, st), tasks_table(st), workers_table(st)]
    parts.append(run_line(st))
    if st.sources:
        parts.append(sources_text(st))
    if st.cascades:
        parts.append(Text("\n".join(c.line() for c in st.cascades.values())))
    if st.errors:
        parts.append(errors_text(st))
    return Group(*parts)


class Bars:
    """One progress bar per task with work: finished (done + failed + dead) of all items."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} items/s  ETA {task.fields[eta]}"),
            auto_refresh=False,
        )
        self.ids: dict[str, TaskID] = {}

    def update(self, st: FleetStatus) -> None:
        shown, _ = shown_tasks(st)
        width = max((len(t.task) for t in shown), default=0)
        for t in shown:
            if t.task not in self.ids:
                self.ids[t.task] = self.progress.add_task(t.task, total=None, rate="", eta="")
            self.progress.update(
                self.ids[t.task],
                description=t.task.ljust(width),
                total=t.total or None,
                completed=t.finished,
                rate=fmt_rate(t.items_per_second),
                eta=fmt_eta(t),
            )


def watch(
    read: Callable[[], FleetStatus],
    *,
    services: str,
    interval: float,
    until_done: bool,
    timeout: float | None,
    console: Console,
) -> bool:
    """Refresh the view every `interval` seconds. Returns True when it stopped
    because nothing was left to do (`until_done`), False on timeout. Ctrl-C
    (KeyboardInterrupt) is the caller's to treat as a normal exit."""
    if not console.is_terminal:
        return _watch_lines(
            read,
            services=services,
            interval=interval,
            until_done=until_done,
            timeout=timeout,
            console=console,
        )
    bars = Bars()
    started = time.monotonic()
    try:
        with Live(console=console, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                st = read()
                bars.update(st)
                parts: list[RenderableType] = [header(services, st), bars.progress, tasks_table(st)]
                parts += [workers_table(st), run_line(st)]
                if st.errors:
                    parts.append(errors_text(st))
                live.update(Group(*parts), refresh=True)
                if until_done and st.done:
                    return True
                if timeout is not None and time.monotonic() - started >= timeout:
                    return False
                time.sleep(interval)
    finally:
        if not console.is_terminal:  # a file or pipe gets the final view; end its line
            console.line()


def progress_line(st: FleetStatus) -> str:
    """One line of a fleet's progress for a log: per task with items,
    finished/total, items/s and live workers; then what could not be read. Pure."""
    parts = []
    for name, t in st.tasks.items():
        if not t.total and not t.workers:
            continue
        rate = "" if t.items_per_second is None else f", {t.items_per_second:.1f}/s"
        parts.append(f"{name} {t.finished}/{t.total} finished{rate}, {t.workers} worker(s)")
    line = "; ".join(parts) or "no work items"
    if st.errors:
        line += f"; unreadable: {', '.join(sorted(st.errors))}"
    return line


def _watch_lines(
    read: Callable[[], FleetStatus],
    *,
    services: str,
    interval: float,
    until_done: bool,
    timeout: float | None,
    console: Console,
) -> bool:
    """`watch` on output that is not a terminal (a log, a pipe): a timestamped
    progress line whenever it changes (at least once a minute), and the full
    view once at the end. Same return as `watch`."""
    started = time.monotonic()
    last, said_at = "", -1e9
    st: FleetStatus | None = None
    try:
        while True:
            st = read()
            line = progress_line(st)
            if line != last or time.monotonic() - said_at >= 60:
                stamp = time.strftime("%H:%M:%S")
                console.print(f"{stamp} {line}", highlight=False, markup=False, soft_wrap=True)
                last, said_at = line, time.monotonic()
            if until_done and st.done:
                return True
            if timeout is not None and time.monotonic() - started >= timeout:
                return False
            time.sleep(interval)
    finally:
        if st is not None:
            bars = Bars()
            bars.update(st)
            parts: list[RenderableType] = [header(services, st), bars.progress, tasks_table(st)]
            parts += [workers_table(st), run_line(st)]
            if st.errors:
                parts.append(errors_text(st))
            console.print(Group(*parts))


# -- the commands' bodies (fleet/cli/observe.py keeps only thin wrappers) ---------------------


def console() -> Console:
    """stdout; piped into a file or a log, wide enough that the tables keep their columns."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def services_line(settings: Settings) -> str:
    """Where the status comes from, passwords hidden."""
    return f"database {redact(settings.db_url())}\nbroker   {redact(settings.redis_url())}"


def reader(settings: Settings, *, only: str | None) -> Callable[[], FleetStatus]:
    """A function reading the status of the fleet these settings point at; while
    the ledger cannot be read (a locked table: see status.read_ledger), each call
    shows the last figures it read, with their age."""
    client = redis_client(settings.redis_url())
    tasks = configured_tasks(settings.config_file)
    cascades = configured_cascades(settings.config_file)
    last: LedgerRead | None = None

    def remember(url: str, only: str | None, window: float) -> LedgerRead:
        nonlocal last
        last = read_ledger(url, only, window)
        return last

    def read() -> FleetStatus:
        return collect(
            settings.db_url(),
            client,
            tasks=tasks,
            only=only,
            broker_url=settings.redis_url(),
            ledger_reader=remember,
            last_ledger=last,
            cascades=cascades,
        )

    return read


def show_status(
    settings: Settings, *, only: str | None, as_json: bool, out: Console | None = None
) -> int:
    out = out or console()
    st = reader(settings, only=only)()
    if as_json:
        doc = {
            "database": redact(settings.db_url()),
            "broker": redact(settings.redis_url()),
            **st.to_json(),
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        out.print(status_view(st, services_line(settings)))
    return ExitCode.SERVICE if st.errors else ExitCode.OK


def run_watch(
    settings: Settings,
    *,
    only: str | None,
    interval: float,
    until_done: bool,
    timeout: float | None,
    out: Console | None = None,
) -> int:
    out = out or console()
    if not out.is_terminal:  # the view is written once, at the end: say that it is running
        what = f"task {only}" if only else "every task"
        stop = "until nothing is left to do" if until_done else "until Ctrl-C"
        click.echo(f"watching {what} every {interval:g}s {stop}", err=True)
    try:
        finished = watch(
            reader(settings, only=only),
            services=services_line(settings),
            interval=interval,
            until_done=until_done,
            timeout=timeout,
            console=out,
        )
    except KeyboardInterrupt:
        return ExitCode.OK
    if until_done and not finished:
        click.echo(
            "timed out with work unfinished: are workers running? (`fleet worker --task T`)",
            err=True,
        )
        return ExitCode.TIMEOUT
    return ExitCode.OK
