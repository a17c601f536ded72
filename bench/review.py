"""Which review strategy teaches a model most per reviewed item: `bench.review`.

    .venv/bin/python -m bench.review [--rounds 3] [--per-round 50] [--seeds 5] [--start 16]

Pool: the bundled intent training set (config/data/intent.jsonl, 973 texts, 8
labels), its labels standing in for a reviewer's answers. Evaluation: the
independent intent evaluation set (config/data/eval/intent_eval.jsonl, 104
conversations written separately, in other voices), never picked from or tuned on.

The model is a logistic-regression head (scikit-learn, multinomial, C=10) on
frozen all-MiniLM-L6-v2 sentence embeddings (fleet.review.embed), not a
fine-tuned encoder: it retrains in milliseconds, so 5 strategies x 5 seeds x 3
rounds run on a CPU in about a minute, and the strategies' ranking is what is
measured. Per seed: `--start` random labeled items (the same for every
strategy), then each round the strategy (fleet.review.strategies, the code
`fleet review export` runs) picks `--per-round` items from the unlabeled pool
by the current model's probabilities, they are "reviewed" (their pool label
added) and the head is retrained. disagreement uses a committee of two: the
head and a nearest-centroid classifier on the same embeddings.

Prints macro-F1 on the evaluation set per strategy and round (mean and sd over
seeds), each strategy's gain after the last round and that gain / random's gain.
Target: uncertainty, margin and diverse gain >= 1.5 x random's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np


def _load(path: Any, *, conversation: bool) -> tuple[list[str], list[str]]:
    from workers.adapters.text import conversation_text

    texts, labels = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        texts.append(conversation_text(row, max_chars=20000) if conversation else str(row["text"]))
        labels.append(str(row["label"]))
    return texts, labels


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--start", type=int, default=16, help="Random labeled items to start from.")
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from config.data import data_path
    from fleet.review import strategies as st
    from fleet.review.embed import Embedder, minilm_folder

    pool_texts, pool_labels = _load(data_path("intent.jsonl"), conversation=False)
    eval_texts, eval_labels = _load(data_path("eval/intent_eval.jsonl"), conversation=True)
    names = sorted(set(pool_labels))
    t0 = time.perf_counter()
    embedder = Embedder(minilm_folder(None))
    X = embedder.embed(pool_texts)
    E = embedder.embed(eval_texts)
    y = np.array([names.index(lab) for lab in pool_labels])
    ye = np.array([names.index(lab) for lab in eval_labels])
    print(
        f"pool {len(pool_texts)} texts, evaluation {len(eval_texts)} (independent), "
        f"{len(names)} labels; embedded in {time.perf_counter() - t0:.1f}s"
    )

    def fit(idx: list[int]) -> Any:
        return LogisticRegression(C=10.0, max_iter=2000).fit(X[idx], y[idx])

    def macro_f1(model: Any) -> float:
        return float(f1_score(ye, model.predict(E), average="macro", labels=range(len(names))))

    def centroid_labels(idx: list[int], rest: list[int]) -> list[str]:
        known = sorted(set(y[idx]))
        cents = np.stack([X[[i for i in idx if y[i] == k]].mean(0) for k in known])
        return [names[known[j]] for j in (X[rest] @ cents.T).argmax(1)]

    strategies = ["random", "uncertainty", "margin", "diverse", "disagreement"]
    scores: dict[str, list[list[float]]] = {s: [] for s in strategies}
    t1 = time.perf_counter()
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        start = sorted(rng.choice(len(X), size=args.start, replace=False).tolist())
        for strategy in strategies:
            labeled = list(start)
            model = fit(labeled)
            curve = [macro_f1(model)]
            for r in range(args.rounds):
                chosen = set(labeled)
                rest = [i for i in range(len(X)) if i not in chosen]
                proba = model.predict_proba(X[rest])
                cls = [names[c] for c in model.classes_]
                others = centroid_labels(labeled, rest) if strategy == "disagreement" else None
                cands = [
                    st.Candidate(
                        item_id=i,
                        label=cls[int(p.argmax())],
                        scores={cls[k]: float(p[k]) for k in range(len(cls))},
                        other_label=others[j] if others else None,
                    )
                    for j, (i, p) in enumerate(zip(rest, proba, strict=True))
                ]
                n = args.per_round
                if strategy == "random":
                    picked = st.pick_random(cands, n, seed=seed * 100 + r)
                elif strategy == "uncertainty":
                    picked = st.pick_uncertainty(cands, n)
                elif strategy == "margin":
                    picked = st.pick_margin(cands, n)
                elif strategy == "diverse":
                    picked = st.pick_diverse(cands, n, embed=lambda ids: X[list(ids)], seed=seed)
                else:
                    picked = st.pick_disagreement(cands, n)
                    if len(picked) < n:  # fewer disagreements than the budget: most uncertain next
                        extra = [i for i in st.pick_uncertainty(cands, n * 2) if i not in picked]
                        picked += extra[: n - len(picked)]
                labeled += picked
                model = fit(labeled)
                curve.append(macro_f1(model))
            scores[strategy].append(curve)
    print(
        f"{args.seeds} seeds x {len(strategies)} strategies x {args.rounds} rounds of "
        f"{args.per_round} in {time.perf_counter() - t1:.1f}s\n"
    )
    header = "strategy      " + "".join(f"  round {r}      " for r in range(args.rounds + 1))
    print(header + "  gain    gain / random")
    base_gain = statistics.mean(c[-1] - c[0] for c in scores["random"])
    for strategy in strategies:
        curves = scores[strategy]
        cells = []
        for r in range(args.rounds + 1):
            vals = [c[r] for c in curves]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}  ")
        gain = statistics.mean(c[-1] - c[0] for c in curves)
        ratio = gain / base_gain if base_gain > 0 else float("nan")
        print(f"{strategy:13} " + "".join(cells) + f"  {gain:+.3f}  {ratio:.2f}x")
    print(
        "\ntarget: uncertainty, margin and diverse gain >= 1.5 x random's gain after the last round"
    )


if __name__ == "__main__":
    main()
