"""Fitting a trained classifier folder's temperature and measuring its calibration.

`fleet train` calls `calibrate_folder` after training: the folder's logits on
the held-out split fit one temperature (`workers.calibration.fit_temperature`,
Guo et al. 2017), written to `calibration.json` beside the weights, which the
workers apply when they load the folder. `calibration_scores` gives the
expected calibration error (10 equal-width bins) before and after, for the
metrics and the model card.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleet.models.labeled import Example
from fleet.reporting.scoring import expected_calibration_error
from workers.adapters.windowed import readable
from workers.calibration import Calibration, calibrate, softmax, write_calibration


def folder_logits(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[float]], list[str]]:
    """Raw logits (one row of C floats per text, no temperature) of a classifier folder,
    and its label names in id order. CPU, no grad; `progress(done, total)` per batch.
    Emoji the tokenizer cannot read are read as their names, as served
    (`workers.adapters.windowed.readable`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows: list[list[float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                [readable(tokenizer, t) for t in texts[i : i + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            rows.extend(model(**enc).logits.float().tolist())
            if progress is not None:
                progress(len(rows), len(texts))
    return rows, names


def calibration_scores(
    logits: Sequence[Sequence[float]],
    gold: Sequence[int],
    temperature: float,
    bias: Sequence[float] | None = None,
) -> dict[str, float]:
    """ECE (10 bins) of softmax(logits) and of softmax(logits / temperature + bias), with
    accuracy (of the raw argmax) and `accuracy_after` (of the scaled one: a bias can move it)."""
    correct = [
        max(range(len(r)), key=r.__getitem__) == g for r, g in zip(logits, gold, strict=True)
    ]
    raw = [max(softmax(r)) for r in logits]
    probs = [scaled_probs(r, temperature, bias) for r in logits]
    scaled = [max(p) for p in probs]
    correct_after = [
        max(range(len(p)), key=p.__getitem__) == g for p, g in zip(probs, gold, strict=True)
    ]
    n = len(gold)
    return {
        "n": n,
        "accuracy": round(sum(correct) / n, 6) if n else 0.0,
        "ece_before": round(expected_calibration_error(raw, correct), 6),
        "accuracy_after": round(sum(correct_after) / n, 6) if n else 0.0,
        "ece_after": round(expected_calibration_error(scaled, correct_after), 6),
        "mean_confidence_before": round(sum(raw) / n, 6) if n else 0.0,
        "mean_confidence_after": round(sum(scaled) / n, 6) if n else 0.0,
    }


def scaled_probs(
    row: Sequence[float], temperature: float, bias: Sequence[float] | None = None
) -> list[float]:
    """softmax(row / temperature + bias) (bias 0 when None)."""
    if not bias:
        return softmax(row, temperature)
    return softmax([v / temperature + b for v, b in zip(row, bias, strict=True)])


def calibrate_folder(
    model_dir: str | Path,
    held_out: Sequence[Example],
    *,
    fitted_on: str,
    test: Sequence[Example] | None = None,
    max_length: int = 128,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the folder's temperature on `held_out`, write calibration.json, and score it.

    Returns the Calibration and `{"validation": scores, "test": scores | None}`
    (`calibration_scores`; the validation side is where T was fitted, so its
    ECE after is optimistic; `test` is text the fit never saw). Raises
    ValueError for an empty `held_out` or labels the folder lacks.
    """
    texts = [ex.text for ex in held_out]
    logits, names = folder_logits(model_dir, texts, max_length=max_length)
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({ex.label for ex in held_out} - set(index))
    if missing:
        raise ValueError(f"held-out labels the model lacks: {', '.join(missing)}")
    gold = [index[ex.label] for ex in held_out]
    cal = calibrate(logits, gold, fitted_on=fitted_on)
    write_calibration(model_dir, cal)
    scores: dict[str, Any] = {
        "validation": calibration_scores(logits, gold, cal.temperature),
        "test": None,
    }
    if test:
        scores["test"], _ = scored_at(
            model_dir, test, names, cal.temperature, max_length=max_length
        )
    return cal, scores


def labeled_logits(
    model_dir: str | Path,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    max_length: int = 128,
    what: str = "",
) -> tuple[list[list[float]], list[int]]:
    """The folder's raw logits on `examples` and their gold label ids (`labels`: the
    folder's, in id order). Raises ValueError, prefixed with `what`, for labels
    outside `labels`."""
    index = {n: i for i, n in enumerate(labels)}
    missing = sorted({ex.label for ex in examples} - set(index))
    if missing:
        raise ValueError(f"{what}labels the model lacks: {', '.join(missing)}")
    logits, _ = folder_logits(model_dir, [ex.text for ex in examples], max_length=max_length)
    return logits, [index[ex.label] for ex in examples]


def scored_at(
    model_dir: str | Path,
    examples: Sequence[Example],
    labels: Sequence[str],
    temperature: float,
    *,
    max_length: int = 128,
) -> tuple[dict[str, float], float]:
    """`calibration_scores` of the folder's logits on `examples` at `temperature`, and
    the temperature those examples alone would fit (for comparison). Raises
    ValueError for labels outside `labels` (the folder's, in id order)."""
    logits, gold = labeled_logits(model_dir, examples, labels, max_length=max_length)
    own = round(calibrate(logits, gold).temperature, 6)
    return calibration_scores(logits, gold, temperature), own


def calibrate_on_set(
    model_dir: str | Path,
    calibration: Path,
    valid: Sequence[Example],
    labels: Sequence[str],
    *,
    test: Sequence[Example] | None = None,
    max_length: int = 128,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the folder's temperature on a separate calibration file (the `fleet train`
    formats: text written like the traffic the model will serve, apart from the
    training file and any evaluation set), write calibration.json, and score it.

    The held-out split of a training file is written by the same hand as the
    rest of it and can be harder or easier than what the model will meet; a
    temperature is best fitted on data like the deployment's (Guo et al. 2017
    fit on a held-out set of the target distribution). Returns the Calibration
    and `{"calibration_set", "validation", "test", "split_temperature",
    "calibration_data", "calibration_sha256"}`: scores where T was fitted, on the
    held-out split and on `test` (None without one) at that T, the temperature
    the split alone would have given, the file's name and the sha256 of its
    examples. Raises TrainingDataError for an unreadable file, ValueError for
    an empty one or labels the folder lacks."""
    from fleet.models.labeled import data_hash, load_labeled

    examples = load_labeled(calibration)
    if not examples:
        raise ValueError(f"{calibration}: no examples to fit a temperature on")
    sha = data_hash(examples)
    logits, gold = labeled_logits(
        model_dir, examples, labels, max_length=max_length, what=f"{calibration}: "
    )
    cal = calibrate(
        logits,
        gold,
        fitted_on=f"calibration set {calibration.name} ({len(examples)} examples, "
        f"sha256 {sha[:12]})",
    )
    write_calibration(model_dir, cal)
    v_scores, split_t = scored_at(model_dir, valid, labels, cal.temperature, max_length=max_length)
    scores: dict[str, Any] = {
        "calibration_set": calibration_scores(logits, gold, cal.temperature),
        "validation": v_scores,
        "test": None,
        "split_temperature": split_t,
        "calibration_data": calibration.name,
        "calibration_sha256": sha,
    }
    if test:
        scores["test"], _ = scored_at(
            model_dir, test, labels, cal.temperature, max_length=max_length
        )
    return cal, scores


def adapter_log_scores(
    spec: Any,
    models_dir: Path,
    texts: Sequence[str],
    *,
    options: dict[str, Any] | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[float]], list[str]]:
    """Log of each label's score as the task's adapter answers in this process (CPU), one
    row per text in label order, and the label names. `options` override the task's.

    A text of `role: content` lines is given to the adapter as those messages again
    (`workers.adapters.windowed.text_data`), as the fleet serves a conversation. For a
    zero-shot task run with `temperature = 1` these are its cosine similarities up
    to a per-row constant: logits a temperature can be fitted to. Raises ValueError when
    no ladder folder exists or an item fails (its reason)."""
    import dataclasses
    import math

    from config.taskconfig import resolve_model_path, with_model_folders
    from workers.adapters import make_adapter
    from workers.adapters.base import InputError, Prediction, Source
    from workers.adapters.windowed import text_data

    tier = next((t for t in spec.ladder if resolve_model_path(t, models_dir).exists()), None)
    if tier is None:
        raise ValueError(f"no model folder of task {spec.name!r} exists under {models_dir}")
    run_spec = dataclasses.replace(spec, options={**spec.options, **(options or {})})
    adapter = make_adapter(run_spec, max_chars=1_000_000, audio_root=models_dir)
    adapter.load(
        with_model_folders(tier, models_dir), str(resolve_model_path(tier, models_dir)), "cpu"
    )
    names = list(spec.labels)
    rows: list[list[float]] = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = [
                adapter.prepare(Source(i + k, spec.source, str(i + k), text_data(t)))
                for k, t in enumerate(texts[i : i + batch_size])
            ]
            for pred in adapter.predict(batch):
                if isinstance(pred, InputError) or not isinstance(pred, Prediction):
                    raise ValueError(f"item failed: {pred}")
                scores = pred.scores or {}
                rows.append([math.log(max(scores.get(n, 0.0), 1e-12)) for n in names])
            if progress is not None:
                progress(len(rows), len(texts))
    finally:
        adapter.unload()
    return rows, names


# Options that make each kind answer its raw label scores, before any fitted scaling.
RAW_OPTIONS = {
    "zero_shot": {"temperature": 1.0, "label_bias": {}},
    "llm_classify": {"calibrate": False, "temperature": 1.0, "label_bias": {}},
}


def fit_task_temperature(
    spec: Any,
    models_dir: Path,
    examples: Sequence[Example],
    *,
    fitted_on: str,
    bias: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit a zero_shot or llm_classify task's scaling on labeled `examples` (never an
    evaluation set): a temperature and, with `bias`, one additive bias per label
    (`workers.calibration.fit_scaling`) over the task's raw label scores (zero_shot:
    cosine similarities; llm_classify: the label phrases' log-probabilities, without
    the content-free prior).

    Returns the Calibration (`extra["label_bias"]`: label -> bias) and scores on
    `examples`: before = as the task serves now, after = the fitted scaling
    (`accuracy_after` too: a bias can move the argmax). Raises ValueError for another
    kind of task or labels outside the task's. `progress(stage, done, total)` after each
    batch (stages "raw scores", then "served scores")."""
    from workers.calibration import fit_scaling

    def step(stage: str) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda d, t: progress(stage, d, t)

    if spec.kind not in RAW_OPTIONS:
        raise ValueError(
            f"task {spec.name!r} is {spec.kind}; this fits zero_shot and llm_classify scaling"
        )
    names = list(spec.labels)
    stray = sorted({ex.label for ex in examples} - set(names))
    if stray:
        raise ValueError(f"labels the task lacks: {', '.join(stray)}")
    texts = [ex.text for ex in examples]
    logits, _ = adapter_log_scores(
        spec, models_dir, texts, options=RAW_OPTIONS[spec.kind], progress=step("raw scores")
    )
    gold = [names.index(ex.label) for ex in examples]
    if bias:
        t, b = fit_scaling(logits, gold)
    else:
        t, b = calibrate(logits, gold).temperature, [0.0] * len(names)
    cal = Calibration(
        temperature=round(t, 6),
        method="temperature and per-label bias (vector scaling's bias, Guo et al. 2017), "
        "NLL minimised on labeled training text",
        fitted_on=fitted_on,
        n=len(gold),
        extra={"label_bias": dict(zip(names, b, strict=True))},
    )
    served, _ = adapter_log_scores(spec, models_dir, texts, progress=step("served scores"))
    before = calibration_scores(served, gold, 1.0)
    after = calibration_scores(logits, gold, cal.temperature, b)
    return cal, {
        "n": len(gold),
        "accuracy": before["accuracy"],
        "accuracy_after": after["accuracy_after"],
        "configured_temperature": spec.options.get("temperature"),
        "ece_before": before["ece_after"],
        "ece_after": after["ece_after"],
    }


def scaling_toml(cal: Calibration) -> str:
    """The task options that serve a fitted scaling (`temperature`, `label_bias`)."""
    bias = cal.extra.get("label_bias") or {}
    inner = ", ".join(f"{k} = {v:.4f}" for k, v in bias.items())
    return f"temperature = {cal.temperature:.4f}\nlabel_bias = {{ {inner} }}"
