"""Preparing the bundled models into FLEET_MODELS_DIR, once.

Nothing is downloaded: every model comes from an installed package, converted
or fine-tuned here, and written atomically (a half-built folder never looks
ready). Model weights never live in the repository.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from config.data import data_path
from fleet.models.catalogue import (
    ALL,
    BUNDLED,
    GEMMA,
    INTENT,
    MINILM,
    OPTIONAL,
    SMOLLM,
    WHISPER,
    WHISPER_BASE,
    BundledClassifier,
    minilm_path,
)

Echo = Callable[[str], None]


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


def train_bundled(
    models_dir: Path,
    bundled: BundledClassifier,
    *,
    config: Any = None,
    echo: Echo = print,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune MiniLM on a bundled set into models_dir/<folder>, scored on its eval set.

    Labels (and their id order) are the task's `[labels.*]` set in the bundled
    tasks.toml. Writes the folder whole, then moves it into place.
    """
    from config.taskconfig import load_tasks
    from fleet.models.finetune import TrainConfig
    from fleet.models.labeled import load_labeled
    from fleet.models.training import run_training

    spec = load_tasks(None)[bundled.task]
    test = data_path(bundled.eval)
    echo(f"training {bundled.folder} from the bundled MiniLM on {bundled.data} (once)")
    metrics = run_training(
        spec,
        models_dir=models_dir,
        examples=load_labeled(data_path(bundled.data)),
        data_name=bundled.data,
        out=models_dir / bundled.folder,
        base=None,
        eval_file=None,
        test_file=test if test.is_file() else None,
        config=config or TrainConfig(**bundled.train_options()),
        test_fraction=0.2,
        quiet=quiet,
    )
    line = f"{bundled.folder}: split accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    if metrics.get("test"):
        line += f"; independent set accuracy {metrics['test']['accuracy']:.3f} (n={metrics['test']['n']})"
    cal = metrics.get("calibration")
    if cal:
        line += f"; temperature {cal['temperature']:.3f} (calibration.json)"
    echo(line)
    return metrics


def _filler_changed(
    recorded: dict[str, Any], bundled: BundledClassifier, *, by_turn: bool = False
) -> str | None:
    """Why the composed part of a built folder differs from what this version ships
    (`by_turn`: the tier it serves reads by user turn, so its training adds each
    small-talk user turn alone; `fleet.models.compose`)."""
    from fleet.models.compose import filler_sha256

    composed = recorded.get("composed") or {}
    if not bundled.filler:
        return (
            "it was trained with composed conversations this version does not use"
            if composed
            else None
        )
    shipped = filler_sha256(data_path(bundled.filler))
    built = composed.get("filler_sha256")
    if built == shipped:
        per = composed.get("per_example")
        if per != bundled.filler_per_example:
            return f"it was composed {per} times per request, this version composes {bundled.filler_per_example}"
        if bool(composed.get("by_turn")) != by_turn:
            return (
                "its tier reads one user turn at a time and it was trained without small-talk turns alone"
                if by_turn
                else "it was trained with small-talk turns alone for a tier that reads whole windows"
            )
        return None
    if not built:
        return f"it was trained without the small-talk compositions of {bundled.filler}"
    return f"it was composed with another version of {bundled.filler}"


def _served_by_turn(target: Path, bundled: BundledClassifier) -> bool:
    """Whether the bundled tier serving `target` reads one user turn at a time."""
    from config.taskconfig import load_tasks
    from fleet.models.training import served_reading

    return served_reading(load_tasks(None)[bundled.task], target).window_by == "user_turns"


def _calibration_changed(recorded: dict[str, Any], bundled: BundledClassifier) -> str | None:
    """Why the temperature of a built folder was fitted on other data than this
    version ships (its calibration file, or the held-out split where it has none)."""
    from fleet.models.labeled import data_hash, load_labeled

    built = (recorded.get("calibration") or {}).get("calibration_sha256")
    if not bundled.calibration:
        return (
            "its temperature was fitted on a calibration file this version does not use"
            if built
            else None
        )
    shipped = data_hash(load_labeled(data_path(bundled.calibration)))
    if built == shipped:
        return None
    if not built:
        return f"its temperature was not fitted on {bundled.calibration}"
    return f"its temperature was fitted on another version of {bundled.calibration}"


def _emoji_changed(recorded: dict[str, Any]) -> str | None:
    """Why a built folder read emoji otherwise than this version serves them."""
    from fleet.models.finetune import EMOJI_READING

    if recorded.get("emoji") == EMOJI_READING:
        return None
    return "it was trained reading emoji as [UNK]; this version reads them as their names"


def bundled_is_stale(target: Path, bundled: BundledClassifier) -> str | None:
    """Why the built folder `target` no longer matches the training set this
    version ships (a reason to print), or None when it does.

    The folder's training_metrics.json records the sha256 of the examples it was
    trained on (`fleet.models.labeled.data_hash`); an upgrade that widens a
    bundled set changes it. A folder without the record (built by hand, or by a
    version that did not write it) is left alone: it cannot be told stale.
    """
    import json

    from fleet.models.finetune import METRICS_FILE
    from fleet.models.labeled import data_hash, load_labeled

    metrics = target / METRICS_FILE
    if not metrics.is_file():
        return None
    try:
        recorded = json.loads(metrics.read_text(encoding="utf-8"))
    except ValueError:
        return None
    built = recorded.get("data_sha256") if isinstance(recorded, dict) else None
    if not built:
        return None
    shipped = data_hash(load_labeled(data_path(bundled.data)))
    if built == shipped:
        changed = (
            _filler_changed(recorded, bundled, by_turn=_served_by_turn(target, bundled))
            or _calibration_changed(recorded, bundled)
            or _emoji_changed(recorded)
        )
        return f"{bundled.folder}: {changed}" if changed else None
    return (
        f"{bundled.folder} was trained on another version of {bundled.data} "
        f"(sha256 {built[:12]}, shipped now {shipped[:12]})"
    )


def prepare_bundled(
    models_dir: Path, folder: str, *, force: bool = False, echo: Echo = print
) -> Path:
    """models_dir/<folder> for a bundled classifier: trained unless already there and
    trained on the training set this version ships (a folder built from an older
    set is retrained, with the reason printed, so an upgrade never serves a model
    its own data no longer describes)."""
    target = models_dir / folder
    bundled = BUNDLED[folder]
    built = (target / "config.json").is_file()
    stale = bundled_is_stale(target, bundled) if built and not force else None
    if stale:
        echo(f"{stale}: retraining")
    if force or not built or stale:
        train_bundled(models_dir, bundled, echo=echo)
    return target


def prepare_intent(models_dir: Path, *, force: bool = False, echo: Echo = print) -> Path:
    return prepare_bundled(models_dir, INTENT, force=force, echo=echo)


def _prepare_one(name: str, models_dir: Path, force: bool, echo: Echo) -> Path:
    if name in BUNDLED:
        return prepare_bundled(models_dir, name, force=force, echo=echo)
    if name == MINILM:
        return prepare_minilm(models_dir, force=force)
    if name == WHISPER:
        from fleet.models.convert.whisper_ct2 import prepare_whisper

        return prepare_whisper(models_dir, force=force)
    if name == WHISPER_BASE:
        from fleet.models.convert.whisper_ct2 import prepare_whisper_base

        return prepare_whisper_base(models_dir, force=force)
    if name == SMOLLM:
        from fleet.models.convert.smollm import prepare_smollm

        return prepare_smollm(models_dir, force=force)
    if name == GEMMA:
        from fleet.models.convert.gemma import prepare_gemma

        return prepare_gemma(models_dir, force=force)
    raise ValueError(f"unknown model {name!r}; bundled models: {', '.join(ALL + OPTIONAL)}")


def prepare_models(
    models_dir: Path, *, only: Sequence[str] = (), force: bool = False, echo: Echo = print
) -> Iterator[tuple[str, Path, float]]:
    for name in only or ALL:
        started = time.perf_counter()
        path = _prepare_one(name, models_dir, force, echo)
        yield name, path, time.perf_counter() - started
