"""Cross-fitted calibration: the temperature fitted on out-of-fold logits of the whole
training file rather than on one held-out split.

`fleet train --calibration-folds K` (K >= 2) comes here after the served model is
trained as usual (its split, early stopping, best epoch). The examples are cut
into K stratified folds; for each fold a fresh model is trained on the other K-1
with the served run's settings (its learning-rate schedule included) stopped
after the served run's best epoch (no early stopping and no checkpoint choice:
the fold's logits choose nothing), and
its raw logits on the fold are kept. One temperature is fitted on all N
out-of-fold logits (`workers.calibration.calibrate`, Guo et al. 2017), so it
reflects every line of the training file instead of the 20 % one split happened
to hold out (a split harder or easier than the file over- or under-softens).
This is the cross-fitting of Chernozhukov et al. 2018 ("Double/debiased machine
learning"), and the usual k-fold way of fitting a post-hoc calibrator
(scikit-learn's `CalibratedClassifierCV(ensemble=False)`).

Cost: K more trainings of (K-1)/K of the file each, without per-epoch evaluation
(about K times the served run's training time on CPU).
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.models.classifier import TrainConfig, train_classifier
from fleet.models.labeled import Example, TrainingDataError
from fleet.models.trainer import ProgressFn


def stratified_folds(examples: Sequence[Example], k: int, *, seed: int = 0) -> list[list[int]]:
    """K lists of example indices, each label's examples dealt round-robin over the
    folds after a seeded shuffle (labels in sorted order, one RNG: deterministic).

    Raises TrainingDataError when K < 2 or a fold would be empty (fewer than K
    examples), or a label has fewer than 2 examples (a fold's training side would
    lack it)."""
    if k < 2:
        raise TrainingDataError(f"--calibration-folds needs at least 2 folds, got {k}")
    if len(examples) < k:
        raise TrainingDataError(
            f"{len(examples)} examples cannot fill {k} folds: give fewer --calibration-folds"
        )
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    thin = sorted(lab for lab, idx in by_label.items() if len(idx) < 2)
    if thin:
        raise TrainingDataError(
            f"labels with fewer than 2 examples cannot be cross-fitted: {', '.join(thin)}"
        )
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for label in sorted(by_label):
        idx = list(by_label[label])
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(i)
        start = (start + len(idx)) % k  # the next label starts where this one stopped
    return [sorted(f) for f in folds]


def out_of_fold_logits(
    examples: Sequence[Example],
    labels: Sequence[str],
    k: int,
    *,
    epochs: int,
    config: TrainConfig,
    base: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[list[float]], list[int]]:
    """Raw logits (N rows of C floats, in `examples` order) each from the fold model that
    never saw that example, and the gold label ids. Each fold model is trained for
    `epochs` epochs with `config` (the served run's settings, its learning-rate schedule
    laid out over `config.epochs` as the served run's was: a schedule squeezed into
    `epochs` would decay sooner and leave the fold models less sure than the served one)
    and discarded.

    Raises TrainingDataError for folds that cannot be cut (`stratified_folds`).
    `progress` gets each fold's training events and `{"stage": "eval", "set":
    "cross-fit fold i/K", ...}` while its logits are read."""
    from fleet.models.temperature import folder_logits

    folds = stratified_folds(examples, k, seed=config.seed)
    index = {n: i for i, n in enumerate(labels)}
    fold_config = dataclasses.replace(config, calibration_folds=0)
    rows: list[list[float] | None] = [None] * len(examples)
    for f, held in enumerate(folds, start=1):
        held_set = set(held)
        train = [ex for i, ex in enumerate(examples) if i not in held_set]
        valid = [examples[i] for i in held]
        name = f"cross-fit fold {f}/{k}"

        def step(done: int, total: int, name: str = name) -> None:
            if progress is not None:
                progress({"stage": "eval", "set": name, "done": done, "total": total})

        with tempfile.TemporaryDirectory(prefix="fleet-crossfit-") as tmp:
            train_classifier(
                train,
                valid,
                labels,
                tmp,
                base=base,
                config=fold_config,
                progress=progress,
                pick_best=False,
                stop_after=epochs,
            )
            got, _ = folder_logits(
                tmp,
                [ex.text for ex in valid],
                max_length=fold_config.reading().max_length,
                progress=step,
            )
        for i, row in zip(held, got, strict=True):
            rows[i] = row
    return [r for r in rows if r is not None], [index[ex.label] for ex in examples]


def cross_fitted_calibration(
    out_dir: str | Path,
    examples: Sequence[Example],
    labels: Sequence[str],
    valid: Sequence[Example],
    k: int,
    *,
    epochs: int,
    config: TrainConfig,
    base: str | Path | None = None,
    test: Sequence[Example] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fit the served folder's temperature on K-fold out-of-fold logits of `examples`,
    write calibration.json into `out_dir`, and score it.

    Returns the Calibration and `{"validation", "test", "out_of_fold",
    "split_temperature"}`: calibration_scores of the held-out split `valid` and of
    `test` (None without one) read by the served folder at the cross-fitted
    temperature, of the out-of-fold logits themselves (where T was fitted), and the
    temperature the held-out split alone would have given (for comparison).
    Raises TrainingDataError as `out_of_fold_logits`."""
    from fleet.models.temperature import calibration_scores, scored_at
    from workers.calibration import calibrate, write_calibration

    logits, gold = out_of_fold_logits(
        examples, labels, k, epochs=epochs, config=config, base=base, progress=progress
    )
    cal = calibrate(
        logits,
        gold,
        fitted_on=f"out-of-fold logits of {k}-fold cross-fitting over all {len(examples)} "
        f"training examples ({epochs} epochs per fold)",
    )
    write_calibration(out_dir, cal)
    max_length = config.reading().max_length
    v_scores, split_t = scored_at(out_dir, valid, labels, cal.temperature, max_length=max_length)
    scores: dict[str, Any] = {
        "validation": v_scores,
        "test": None,
        "out_of_fold": calibration_scores(logits, gold, cal.temperature),
        "split_temperature": split_t,
    }
    if test:
        scores["test"], _ = scored_at(out_dir, test, labels, cal.temperature, max_length=max_length)
    return cal, scores
