"""The text `fleet train` writes beside a trained folder: the TOML lines that serve it
and the model card (README.md) made from its training metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.adapters.windowed import Reading

SERVED_MAX_LENGTH = 256  # the bundled tiers' max_length (config/data/tasks.toml)


def tier_toml(task: str, name: str, path: str | Path, *, reading: Reading | None = None) -> str:
    """The TOML lines that put a trained folder at the top of `task`'s ladder, reading
    as it was trained (max_length, pooling, max_windows, window_overlap, window_by,
    turn_context)."""
    reading = reading or Reading(SERVED_MAX_LENGTH)
    lines = (
        f"[[tasks.{task}.ladder]]\n"
        f"name = {json.dumps(name)}\n"
        f"path = {json.dumps(str(path))}\n"
        f"max_length = {reading.max_length}\n"
        "max_batch_tokens = 8192\n"
        f"pooling = {json.dumps(reading.pooling)}\n"
        f"window_overlap = {reading.overlap}\n"
    )
    if reading.max_windows is not None:
        lines += f"max_windows = {reading.max_windows}\n"
    if reading.window_by != "tokens":
        lines += f"window_by = {json.dumps(reading.window_by)}\n"
        lines += f"turn_context = {reading.turn_context}\n"
    return lines


def calibration_lines(cal: dict[str, Any] | None) -> str:
    """The model card's calibration paragraph: the fitted temperature and ECE before/after."""
    if not cal:
        return "\nNo calibration.json: confidences are the raw softmax.\n"

    def ece(name: str, s: dict[str, Any] | None) -> str:
        if not s:
            return ""
        return f"| {name} | {s['n']} | {s['ece_before']:.3f} | {s['ece_after']:.3f} |\n"

    if cal.get("out_of_fold"):
        rows = ece("out of fold (fitted on it)", cal["out_of_fold"])
        rows += ece("validation", cal.get("validation"))
    elif cal.get("calibration_set"):
        rows = ece(f"{cal['calibration_data']} (fitted on it)", cal["calibration_set"])
        rows += ece("validation", cal.get("validation"))
    else:
        rows = ece("validation (fitted on it)", cal.get("validation"))
    return (
        f"\nCalibration: temperature {cal['temperature']:.3f} (`calibration.json`, "
        f"temperature scaling fitted on the {cal['fitted_on']}; NLL {cal['nll_before']:.3f} "
        f"-> {cal['nll_after']:.3f}).\n\n"
        "| set | n | ECE raw | ECE calibrated |\n| --- | --- | --- | --- |\n"
        + rows
        + ece("independent test", cal.get("test"))
    )


def composed_line(composed: dict[str, Any] | None) -> str:
    """The card's line on composed conversations (`fleet.models.compose`), if any."""
    if not composed:
        return ""
    counts = ", ".join(f"{k} {v}" for k, v in composed["added_per_label"].items())
    return (
        f"- composed conversations: {composed['added']} ({counts}), each request among "
        f"small talk of {composed['filler']} (sha256 `{composed['filler_sha256']}`), small "
        f"talk alone as {', '.join(composed['background'])}\n"
    )


def model_card(m: dict[str, Any]) -> str:
    """The model card (README.md) of a trained folder, from its training metrics."""

    if m.get("multi_label"):
        return multi_label_card(m)

    def row(name: str, s: dict[str, Any] | None) -> str:
        if not s:
            return ""
        return f"| {name} | {s['n']} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} |\n"

    counts = ", ".join(f"{k} {v}" for k, v in m["train_per_label"].items())
    return (
        f"# {m['task']} classifier\n\n"
        f"A `sequence_classify` model for the fleet's `{m['task']}` task, fine-tuned by `fleet train`.\n\n"
        f"- base model: `{m['base_model']}`\n"
        f"- training data: {m['data']} (sha256 `{m['data_sha256']}`, {m['n_train']} examples: {counts})\n"
        + composed_line(m.get("composed"))
        + f"- labels (id order): {', '.join(m['labels'])}\n"
        f"- validation: {m['validation']}\n"
        f"- epochs run {m['epochs_run']} (best {m['best_epoch']}), lr {m['config']['lr']}, "
        f"batch {m['config']['batch_size']}, seed {m['config']['seed']}, "
        f"class weights {m['config']['class_weighting']}, {m['train_seconds']} s\n\n"
        "| set | n | accuracy | macro-F1 |\n| --- | --- | --- | --- |\n"
        + row("validation (picked the epoch)", m["validation_scores"])
        + row(f"independent test ({m.get('test_data')})", m.get("test"))
        + calibration_lines(m.get("calibration"))
        + "\nServe it from a task's ladder:\n\n```toml\n"
        + m["toml"]
        + "```\n"
    )


def thresholds_lines(fitted: dict[str, dict[str, Any]] | None) -> str:
    """The model card's table of per-label thresholds (thresholds.json)."""
    if not fitted:
        return "\nNo thresholds.json: every label is kept at >= 0.5.\n"
    rows = "".join(
        f"| {name} | {f['threshold']:.3f} | {f['positives']} | "
        + (
            f"{f['f1']:.3f} | {f['f1_at_default']:.3f} |\n"
            if f["fitted"]
            else "not fitted (no held-out positive) | |\n"
        )
        for name, f in fitted.items()
    )
    return (
        "\nThresholds (`thresholds.json`, per-label F1 maximised on the held-out split; "
        "a tier option `thresholds` overrides them):\n\n"
        "| label | threshold | held-out positives | F1 | F1 at 0.5 |\n| --- | --- | --- | --- | --- |\n"
        + rows
    )


def multi_label_card(m: dict[str, Any]) -> str:
    """The model card of a multi-label folder (`fleet train --multi-label`)."""

    def row(name: str, s: dict[str, Any] | None) -> str:
        if not s:
            return ""
        return (
            f"| {name} | {s['n']} | {s['micro_f1']:.3f} | {s['macro_f1']:.3f} | "
            f"{s['subset_accuracy']:.3f} | {s['hamming_loss']:.3f} |\n"
        )

    counts = ", ".join(f"{k} {v}" for k, v in m["train_per_label"].items())
    cal = m.get("calibration") or {}
    cal_line = ""
    if cal:
        cal_line = (
            f"\nCalibration: temperature {cal['temperature']:.3f} on the sigmoids "
            f"(`calibration.json`, binary NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f} "
            f"on the {cal['fitted_on']}); ECE over label decisions, validation "
            f"{cal['validation']['ece_before']:.3f} -> {cal['validation']['ece_after']:.3f}"
            + (
                f", test {cal['test']['ece_before']:.3f} -> {cal['test']['ece_after']:.3f}"
                if cal.get("test")
                else ""
            )
            + ".\n"
        )
    return (
        f"# {m['task']} classifier (multi-label)\n\n"
        f"A multi-label `sequence_classify` model for the fleet's `{m['task']}` task, fine-tuned "
        "by `fleet train --multi-label` (binary cross-entropy; config.json `problem_type = "
        '"multi_label_classification"`): a sigmoid per label, each kept at or above its threshold.\n\n'
        f"- base model: `{m['base_model']}`\n"
        f"- training data: {m['data']} (sha256 `{m['data_sha256']}`, {m['n_train']} examples; "
        f"examples per label: {counts}; {m['train_without_label']} with none)\n"
        f"- labels (id order): {', '.join(m['labels'])}\n"
        f"- validation: {m['validation']}\n"
        f"- epochs run {m['epochs_run']} (best {m['best_epoch']}), lr {m['config']['lr']}, "
        f"batch {m['config']['batch_size']}, seed {m['config']['seed']}, "
        f"positive weights {m['config']['class_weighting']}, {m['train_seconds']} s\n\n"
        "| set | n | micro-F1 | macro-F1 | subset accuracy | Hamming loss |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        + row("validation (picked the epoch, fitted the thresholds)", m["validation_scores"])
        + row(f"independent test ({m.get('test_data')})", m.get("test"))
        + thresholds_lines(m.get("thresholds"))
        + cal_line
        + "\nServe it from a task's ladder:\n\n```toml\n"
        + m["toml"]
        + "```\n"
    )
