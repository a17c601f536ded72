"""Which review strategy teaches a model most per reviewed item: `bench.review`.

    .venv/bin/python -m bench.review [--rounds 3] [--per-round 50] [--seeds 5] [--start 16]

Pool: the bundled intent training set (config/data/intent.jsonl, 8 labels), its
labels standing in for a reviewer's answers. Evaluation: the independent intent
sets (config/data/eval/intent_eval.jsonl, 104 conversations written separately,
in other voices; intent_personas.jsonl, 80 written by another method), never
picked from or tuned on.

Two pool designs (`--pool`):

  traffic   (default) what a running fleet reviews: per seed the labels get a
            random frequency rank and the unlabeled pool keeps 1/rank of each
            label's items (Zipf, s = 1: the commonest label all of them, the
            rarest an eighth), as traffic is skewed; the start set is
            `--start-per-label` items of every label (the few examples written
            to bootstrap a label), taken out before the pool is thinned.
  balanced  the earlier design: every item in the pool, `--start` random items
            to start from (the same for every strategy).

The model is a logistic-regression head (scikit-learn, multinomial, C=10) on
frozen all-MiniLM-L6-v2 sentence embeddings (fleet.review.embed), not a
fine-tuned encoder: it retrains in milliseconds, so 5 strategies x 5 seeds x 3
rounds run on a CPU in about a minute, and the strategies' ranking is what is
measured. Each round the strategy (fleet.review.strategies, the code
`fleet review export` runs) picks `--per-round` items from the unlabeled pool
by the current model's probabilities, they are "reviewed" (their pool label
added) and the head is retrained on everything labeled so far. disagreement
uses a committee of two: the head and a nearest-centroid classifier on the same
embeddings.

Prints macro-F1 on each evaluation set per strategy and round (mean and sd over
seeds), each strategy's gain after the last round and that gain / random's
gain, and every seed's curve.
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


def _pick(strategy: str, cands: list[Any], n: int, *, X: Any, seed: int, round_: int) -> list[int]:
    """The items one strategy sends for review this round."""
    from fleet.review import strategies as st

    if strategy == "random":
        return st.pick_random(cands, n, seed=seed * 100 + round_)
    if strategy == "uncertainty":
        return st.pick_uncertainty(cands, n)
    if strategy == "margin":
        return st.pick_margin(cands, n)
    if strategy == "diverse":
        return st.pick_diverse(cands, n, embed=lambda ids: X[list(ids)], seed=seed)
    picked = st.pick_disagreement(cands, n)
    if len(picked) < n:  # fewer disagreements than the budget: most uncertain next
        extra = [i for i in st.pick_uncertainty(cands, n * 2) if i not in picked]
        picked += extra[: n - len(picked)]
    return picked


def _table(scores: dict[str, list[list[dict[str, float]]]], ev: str, rounds: int) -> None:
    """Mean ± sd per strategy and round on one evaluation set, the gains, every seed."""
    seeds = len(scores["random"])
    print(f"\nmacro-F1 on {ev}, mean ± sd over {seeds} seeds")
    header = "strategy      " + "".join(f"  round {r}      " for r in range(rounds + 1))
    print(header + "  gain    gain / random")
    base_gain = statistics.mean(c[-1][ev] - c[0][ev] for c in scores["random"])
    for strategy, curves in scores.items():
        cells = []
        for r in range(rounds + 1):
            vals = [c[r][ev] for c in curves]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}  ")
        gain = statistics.mean(c[-1][ev] - c[0][ev] for c in curves)
        ratio = gain / base_gain if base_gain > 0 else float("nan")
        print(f"{strategy:13} " + "".join(cells) + f"  {gain:+.3f}  {ratio:.2f}x")
    print("every seed (round 0 .. last):")
    for strategy, curves in scores.items():
        for seed, c in enumerate(curves):
            print(f"  {strategy:13} seed {seed}: " + " ".join(f"{x[ev]:.3f}" for x in c))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pool", choices=("traffic", "balanced"), default="traffic")
    ap.add_argument(
        "--start", type=int, default=16, help="balanced: random labeled items to start from."
    )
    ap.add_argument(
        "--start-per-label", type=int, default=3, help="traffic: start items of each label."
    )
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from config.data import data_path as data_file
    from fleet.models.labeled import load_labeled
    from fleet.review import strategies as st
    from fleet.review.embed import Embedder, minilm_folder

    rows = load_labeled(data_file("intent.jsonl"))  # lines of text or of messages
    pool_texts, pool_labels = [r.text for r in rows], [r.label for r in rows]
    evals = {
        "intent_eval": _load(data_file("eval/intent_eval.jsonl"), conversation=True),
        "intent_personas": _load(data_file("eval/intent_personas.jsonl"), conversation=True),
    }
    names = sorted(set(pool_labels))
    t0 = time.perf_counter()
    embedder = Embedder(minilm_folder(None))
    X = embedder.embed(pool_texts)
    y = np.array([names.index(lab) for lab in pool_labels])
    E = {
        k: (embedder.embed(t), np.array([names.index(lab) for lab in ls]))
        for k, (t, ls) in evals.items()
    }
    print(
        f"pool file {len(pool_texts)} texts, {len(names)} labels; evaluation "
        + ", ".join(f"{k} {len(v[1])}" for k, v in E.items())
        + f" (independent); embedded in {time.perf_counter() - t0:.1f}s; design: {args.pool}"
    )

    def fit(idx: list[int]) -> Any:
        return LogisticRegression(C=10.0, max_iter=2000).fit(X[idx], y[idx])

    def macro_f1(model: Any) -> dict[str, float]:
        return {
            k: float(f1_score(ye, model.predict(Ek), average="macro", labels=range(len(names))))
            for k, (Ek, ye) in E.items()
        }

    def centroid_labels(idx: list[int], rest: list[int]) -> list[str]:
        known = sorted(set(y[idx]))
        cents = np.stack([X[[i for i in idx if y[i] == k]].mean(0) for k in known])
        return [names[known[j]] for j in (X[rest] @ cents.T).argmax(1)]

    def design(seed: int) -> tuple[list[int], list[int]]:
        """(start items, unlabeled pool) of one seed."""
        rng = np.random.default_rng(seed)
        if args.pool == "balanced":
            start = sorted(rng.choice(len(X), size=args.start, replace=False).tolist())
            return start, [i for i in range(len(X)) if i not in set(start)]
        ranks = rng.permutation(len(names)) + 1  # label k's frequency rank
        start, pool = [], []
        for k in range(len(names)):
            items = rng.permutation(np.flatnonzero(y == k)).tolist()
            start += items[: args.start_per_label]
            rest = items[args.start_per_label :]
            pool += rest[: int(np.ceil(len(rest) / ranks[k]))]
        return sorted(start), sorted(pool)

    strategies = ["random", "uncertainty", "margin", "diverse", "disagreement"]
    scores: dict[str, list[list[dict[str, float]]]] = {s: [] for s in strategies}
    t1 = time.perf_counter()
    for seed in range(args.seeds):
        start, pool = design(seed)
        if seed == 0:
            shares = np.bincount(y[pool], minlength=len(names))
            print(
                f"seed 0: start {len(start)} items, pool {len(pool)} items "
                f"(per label, commonest first: {sorted(shares.tolist(), reverse=True)})"
            )
        for strategy in strategies:
            labeled = list(start)
            model = fit(labeled)
            curve = [macro_f1(model)]
            for r in range(args.rounds):
                chosen = set(labeled)
                rest = [i for i in pool if i not in chosen]
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
                picked = _pick(strategy, cands, args.per_round, X=X, seed=seed, round_=r)
                labeled += picked
                model = fit(labeled)
                curve.append(macro_f1(model))
            scores[strategy].append(curve)
    print(
        f"{args.seeds} seeds x {len(strategies)} strategies x {args.rounds} rounds of "
        f"{args.per_round} in {time.perf_counter() - t1:.1f}s"
    )
    for ev in E:
        _table(scores, ev, args.rounds)
    print(
        "\ntarget: uncertainty, margin and diverse gain >= 1.5 x random's gain after the last round"
    )


if __name__ == "__main__":
    main()
