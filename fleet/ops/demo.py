"""What `fleet demo` runs: the whole nightly job once, on one machine.

Prepares the bundled models, ingests the sample conversations and (with
espeak-ng installed) a few spoken sentences, starts one real `celery worker`
subprocess per task the way `fleet run --local-workers` does (fleet.ops.localworkers:
one task at a time when memory is short), drives the run with a progress bar,
prints the results and stops the workers.

The transcribe worker starts on whisper-base under a simulated memory cap
(FLEET_SIMULATE_MEMORY) that the short spoken samples fit; then a long recording
arrives that does not, the worker steps down to whisper-tiny.en, and the audio
table shows which model did which file.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from config.data import data_path
from config.settings import Settings
from config.taskconfig import TaskSpec
from fleet.observe.display import out, results_table

if TYPE_CHECKING:
    from celery import Celery


class DemoContext(Protocol):
    """What the demo needs of its caller (the `fleet` command's context)."""

    settings: Settings

    def services(self) -> Settings:
        """The settings with the services started and their URLs filled in."""
        ...

    def task(self, name: str) -> TaskSpec:
        """One task of the task config."""
        ...

    def app(self) -> Celery:
        """The Celery app on the resolved services."""
        ...


def _data(name: str) -> Path:
    return data_path(name)


def _speak_samples(audio_root: Path) -> tuple[Path, dict[str, tuple[str, str]]] | None:
    """espeak-ng speaks the sample sentences into audio_root/demo (once)."""
    if shutil.which("espeak-ng") is None:
        return None
    folder = audio_root / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    spoken: dict[str, tuple[str, str]] = {}
    for i, line in enumerate(_data("sample_speech.txt").read_text().splitlines()):
        if not line.strip():
            continue
        sentence, _, label = line.partition("\t")
        wav = folder / f"speech-{i:02d}.wav"
        if not wav.exists():
            subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, capture_output=True)
        spoken[f"demo/{wav.name}"] = (sentence, label.strip())
    return folder, spoken


def _speak_long(audio_root: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A long recording (every sample sentence, twice) in audio_root/demo-late (once)."""
    folder = audio_root / "demo-late"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln.partition("\t")[0] for ln in _data("sample_speech.txt").read_text().splitlines()]
    text = " ".join([ln for ln in lines if ln.strip()] * 2)
    wav = folder / "meeting.wav"
    if not wav.exists():
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    return folder, {f"demo-late/{wav.name}": (text, "")}


def _memory_cap(short: list[Path], long: Path) -> int | None:
    """A tier-0 budget (centiseconds of padded audio) that all short files fit in one
    sub-batch and the long file does not: midway between the two costs."""
    import soundfile as sf

    fits = max(round(sf.info(str(f)).duration * 100) for f in short) * len(short)
    too_big = round(sf.info(str(long)).duration * 100)
    return (fits + too_big) // 2 if too_big > fits else None


def run_demo(
    ctx: DemoContext,
    *,
    conversations: Path | None,
    timeout: float,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """Run the demo; returns the exit status: 0, or 4 when it timed out with work unfinished.

    `conversations` replaces the bundled sample conversations; `timeout` bounds
    each drive (seconds). `echo` gets the report lines (stdout), `warn` the
    problems (stderr); the tables go to stdout.

    Raises:
        LocalWorkersFailed: only the work of tasks whose worker cannot start is left.
    """
    from fleet.models.catalogue import (
        MINILM,
        SENTIMENT,
        SMOLLM,
        WHISPER,
        WHISPER_BASE,
        WORTHINESS,
    )
    from fleet.models.prepare import (
        prepare_intent,
        prepare_models,
    )
    from fleet.observe.display import byte_progress, run_progress
    from fleet.ops.localworkers import local_workers, say
    from fleet.reporting.queries import fetch_results
    from producer.ingest import ingest_audio_dir, ingest_conversations_file
    from producer.runner import run_until_done

    t0 = time.monotonic()
    embedded = ctx.settings.embedded  # before services() fills in the URLs
    s = ctx.services()
    where = "embedded, under " + str(s.state_dir) if embedded else "DATABASE_URL / BROKER_URL"
    echo(f"services: {where}")
    prepare_intent(s.resolved_models_dir, echo=echo)
    only = [WORTHINESS, SENTIMENT, MINILM, SMOLLM]
    for _ in prepare_models(s.resolved_models_dir, only=only, echo=echo):
        pass
    # intent by the trained encoder, topic zero-shot, llm_classify by LLM label scoring
    specs = [ctx.task(t) for t in ("intent", "topic", "llm_classify", "worthiness", "sentiment")]

    path = conversations or _data("sample_conversations.jsonl")
    with path.open("rb") as f, byte_progress(path.stat().st_size, "ingest") as advance:
        report = ingest_conversations_file(s.db_url(), f, progress=advance)
    echo(
        f"conversations: {report.inserted} new, {report.already_present} already there, {len(report.bad)} bad lines"
    )

    spoken = _speak_samples(s.resolved_audio_root)
    cap_env: dict[str, str] = {}
    late: tuple[Path, dict[str, tuple[str, str]]] | None = None
    if spoken is None:
        echo("audio: skipped (install espeak-ng to add spoken samples)")
    else:
        only = [WHISPER_BASE, WHISPER]
        for _ in prepare_models(s.resolved_models_dir, only=only, echo=echo):
            pass
        audio = ingest_audio_dir(s.db_url(), spoken[0], audio_root=s.resolved_audio_root)
        echo(f"audio files: {audio.inserted} new, {audio.already_present} already there")
        specs += [ctx.task("transcribe"), ctx.task("audio_intent")]
        late = _speak_long(s.resolved_audio_root)
        root = s.resolved_audio_root
        cap = _memory_cap([root / k for k in spoken[1]], root / next(iter(late[1])))
        if cap is not None:
            cap_env["FLEET_SIMULATE_MEMORY"] = f"0:{cap}"
            echo(
                f"transcribe: whisper-base under a simulated memory cap of {cap / 100:.0f} s of "
                "padded audio per sub-batch (the short samples fit, a long recording will not)"
            )

    # The same path as `fleet run --local-workers`: a worker per task (all at once, or
    # one task at a time when memory is short), stopped at the end, also on Ctrl-C.
    with local_workers(specs, s, echo=say, extra_env={"transcribe": cap_env}) as lw:
        with run_progress([sp.name for sp in specs], workers=lw.notes) as update:
            run = run_until_done(
                s.db_url(),
                ctx.app(),
                specs,
                s,
                trigger="demo",
                timeout=timeout,
                progress=lw.wrap(update),
                gate=lw.gate,
            )
        counts, timed_out = dict(run.counts), run.timed_out
        shown = dict(spoken[1]) if spoken is not None else {}
        if late is not None and not timed_out:
            # The long recording arrives after the samples: under the cap it does not fit
            # whisper-base, so the worker steps down to whisper-tiny.en for it.
            ingest_audio_dir(s.db_url(), late[0], audio_root=s.resolved_audio_root)
            echo(f"audio: a long recording arrives ({next(iter(late[1]))})")
            audio_specs = [sp for sp in specs if sp.source == "audio"]
            with run_progress([sp.name for sp in audio_specs], workers=lw.notes) as update:
                again = run_until_done(
                    s.db_url(),
                    ctx.app(),
                    audio_specs,
                    s,
                    trigger="demo",
                    timeout=timeout,
                    progress=lw.wrap(update),
                    gate=lw.gate,
                )
            counts.update(again.counts)
            timed_out = again.timed_out
            shown.update(late[1])

    rows = fetch_results(s.db_url(), task="intent", limit=None)
    results_table(rows[:60], title="intent of the sample conversations")
    for task in ("intent", "topic", "llm_classify"):
        scored = [
            (r["label"], (r.get("conversation_meta") or {}).get("gold_intent"))
            for r in (
                rows if task == "intent" else fetch_results(s.db_url(), task=task, limit=None)
            )
            if r["status"] == "done"
        ]
        scored = [(a, b) for a, b in scored if b]
        if scored:
            acc = sum(a == b for a, b in scored) / len(scored)
            echo(f"{task}: agreement with the samples' intended labels: {acc:.1%} of {len(scored)}")
    _labels_table(s.db_url(), fetch_results, ("worthiness", "sentiment"))
    if spoken is not None:
        _audio_table(s.db_url(), fetch_results, shown)
    for name, c in counts.items():
        echo(
            f"{name}: done {c.get('done', 0)}, failed {c.get('failed', 0)}, dead {c.get('dead', 0)}"
        )
    echo(f"demo took {time.monotonic() - t0:.1f}s; worker logs in {s.state_dir / 'logs'}")
    if timed_out:
        warn("timed out with work unfinished; see the worker logs")
        return 4
    return 0


def _audio_table(url: str, fetch_results: Any, spoken: dict[str, tuple[str, str]]) -> None:
    from rich.table import Table

    transcripts = {r["external_id"]: r for r in fetch_results(url, task="transcribe", limit=None)}
    intents = {r["external_id"]: r for r in fetch_results(url, task="audio_intent", limit=None)}
    table = Table(title="spoken samples: transcript (and the model that made it), then intent")
    for col in ("file", "model", "transcript", "intent", "intended"):
        table.add_column(col, overflow="fold")
    for ext, (_sentence, label) in spoken.items():
        t = transcripts.get(ext, {})
        transcript = (
            (t.get("output") or {}).get("transcript") or t.get("error") or t.get("status", "")
        )
        table.add_row(
            ext,
            str(t.get("model_name") or ""),
            str(transcript),
            str(intents.get(ext, {}).get("label") or ""),
            label,
        )
    out.print(table)


def _labels_table(url: str, fetch_results: Any, tasks: tuple[str, ...]) -> None:
    """What the other conversation tasks said of each sample: a column per task, label (confidence)."""
    from rich.table import Table

    by_task = {
        t: {r["external_id"]: r for r in fetch_results(url, task=t, limit=None)} for t in tasks
    }
    table = Table(title=" and ".join(tasks) + " of the sample conversations")
    table.add_column("external_id", no_wrap=True)
    for t in tasks:
        table.add_column(t)
    for eid in sorted(set().union(*by_task.values()))[:60]:
        cells = []
        for t in tasks:
            r = by_task[t].get(eid, {})
            conf = r.get("confidence")
            shown = f" ({conf:.2f})" if isinstance(conf, float) else ""
            cells.append(f"{r.get('label') or r.get('error') or r.get('status', '')}{shown}")
        table.add_row(str(eid), *cells)
    out.print(table)
