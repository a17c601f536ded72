"""Temperature scaling: the one number that turns a classifier's logits into
confidences that mean what they say.

Guo et al. 2017, "On Calibration of Modern Neural Networks" (ICML): divide
the logits by a single temperature T > 0 before the softmax, with T chosen
to minimise the negative log-likelihood (NLL) of a held-out set. The argmax,
and so the label, never changes; only the confidence does (T > 1 softens an
over-confident model, T < 1 sharpens a timid one).

`fleet train` fits T on its validation split (`fit_temperature`) and writes
it to `calibration.json` in the model folder (`write_calibration`); the
workers read it when they load the folder (`read_calibration`) and apply it
to every batch (`scale_logits`). A folder without the file is served with
raw softmax confidences, and says so (`UNCALIBRATED`, in each result's
output and in the worker's load log).

Pure Python except `scale_logits`, which takes whatever tensor or array the
adapter holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
UNCALIBRATED = (
    "no calibration.json in the model folder: confidences are the raw softmax "
    "(retrain with `fleet train`, which fits a temperature on its held-out split)"
)

# Search interval for T: far wider than any fitted value seen in practice
# (0.3 - 5 for fine-tuned encoders, ~0.01 - 0.1 for cosine similarities).
_T_MIN, _T_MAX = 1e-3, 1e3


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and how it was fitted.

    `temperature`: logits are divided by it (> 0). `fitted_on`: a description
    of the held-out set; `n`: its size. `nll_before` / `nll_after`: mean NLL
    (nats per item) at T = 1 and at the fitted T on that set.
    """

    temperature: float
    method: str = "temperature scaling (Guo et al. 2017), NLL minimised on a held-out set"
    fitted_on: str = ""
    n: int = 0
    nll_before: float | None = None
    nll_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def log_softmax(row: Sequence[float], temperature: float = 1.0) -> list[float]:
    """log softmax(row / temperature), computed stably (max subtracted)."""
    scaled = [v / temperature for v in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_z for v in scaled]


def softmax(row: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(row / temperature) as a list of probabilities summing to 1."""
    return [math.exp(v) for v in log_softmax(row, temperature)]


def mean_nll(logits: Sequence[Sequence[float]], gold: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood (nats) of the gold class ids under softmax(logits / T)."""
    if len(logits) != len(gold):
        raise ValueError(f"{len(logits)} rows of logits but {len(gold)} gold labels")
    if not logits:
        raise ValueError("no items to score")
    return -sum(
        log_softmax(row, temperature)[g] for row, g in zip(logits, gold, strict=True)
    ) / len(logits)


def fit_temperature(logits: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """The temperature T minimising the mean NLL of `gold` under softmax(logits / T).

    `logits`: one row of C raw scores per item (C >= 2); `gold`: the index of
    each item's true class. The NLL is convex in beta = 1/T (a log-sum-exp of
    functions linear in beta, minus a linear term), so a golden-section search
    over log T finds the global minimum; T is clamped to [1e-3, 1e3] (a set the
    model gets entirely right drives T towards 0, one it gets entirely wrong
    towards infinity; the clamp keeps the result usable). Raises ValueError
    for no items, rows of different lengths or a gold id out of range.
    """
    if not logits:
        raise ValueError("temperature scaling needs at least one held-out item")
    width = len(logits[0])
    if width < 2 or any(len(row) != width for row in logits):
        raise ValueError("every row of logits needs the same number (>= 2) of classes")
    if any(not 0 <= g < width for g in gold):
        raise ValueError(f"gold class ids must lie in 0..{width - 1}")
    return _golden_temperature(lambda t: mean_nll(logits, gold, t))


def _golden_temperature(nll: Callable[[float], float]) -> float:
    """The T in [1e-3, 1e3] minimising `nll(T)`, by golden-section search over log T
    (the NLLs here are convex in 1/T, so the minimum is the global one)."""
    lo, hi = math.log(_T_MIN), math.log(_T_MAX)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(math.exp(log_t))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):  # interval shrinks by 0.618 per step: ~1e-16 of log(1e6)
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)), stable for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mean_binary_nll(
    logits: Sequence[Sequence[float]], targets: Sequence[Sequence[int]], temperature: float
) -> float:
    """Mean binary negative log-likelihood (nats per label decision) of a multi-label
    model: every (item, label) pair is one yes/no under sigmoid(logit / T).
    `targets`: one row of 0/1 per item, as wide as its logits."""
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} rows of logits but {len(targets)} rows of targets")
    total, n = 0.0, 0
    for row, want in zip(logits, targets, strict=True):
        if len(row) != len(want):
            raise ValueError("every row of targets needs one 0/1 per label")
        for z, y in zip(row, want, strict=True):
            total -= log_sigmoid(z / temperature) if y else log_sigmoid(-z / temperature)
            n += 1
    if not n:
        raise ValueError("no items to score")
    return total / n


SIGMOID_METHOD = (
    "temperature scaling of a multi-label model's sigmoids (Guo et al. 2017 with the "
    "binary NLL of every label decision), minimised on a held-out set"
)


def calibrate_binary(
    logits: Sequence[Sequence[float]], targets: Sequence[Sequence[int]], *, fitted_on: str = ""
) -> Calibration:
    """One temperature for a multi-label model: T minimising `mean_binary_nll` of the
    held-out label decisions (the labels' decisions never change at T: only their
    probabilities, hence which side of a fitted threshold they fall). Raises
    ValueError for no items or rows of different widths."""
    if not logits:
        raise ValueError("temperature scaling needs at least one held-out item")
    t = _golden_temperature(lambda temp: mean_binary_nll(logits, targets, temp))
    return Calibration(
        temperature=round(t, 6),
        method=SIGMOID_METHOD,
        fitted_on=fitted_on,
        n=len(logits),
        nll_before=round(mean_binary_nll(logits, targets, 1.0), 6),
        nll_after=round(mean_binary_nll(logits, targets, t), 6),
    )


def biased_nll(
    logits: Sequence[Sequence[float]],
    gold: Sequence[int],
    temperature: float,
    bias: Sequence[float],
) -> float:
    """Mean NLL (nats) of the gold ids under softmax(logits / T + bias)."""
    rows = [[v + b for v, b in zip(log_softmax(r, temperature), bias, strict=True)] for r in logits]
    return -sum(log_softmax(r)[g] for r, g in zip(rows, gold, strict=True)) / len(rows)


def fit_scaling(
    logits: Sequence[Sequence[float]],
    gold: Sequence[int],
    *,
    steps: int = 600,
    ridge: float = 0.01,
) -> tuple[float, list[float]]:
    """A temperature and one additive bias per class, minimising the mean NLL of `gold`
    under softmax(logits / T + bias): the bias half of vector scaling (Guo et al. 2017,
    section 4.2), for scores whose classes are not on one scale (a zero-shot label's
    similarity, an LM's preference for some label phrases).

    The NLL is convex in (1/T, bias); T starts at `fit_temperature`'s value and Adam
    (lr 0.05, `steps` full-batch steps) moves log(1/T) and the biases, with an L2
    penalty `ridge` x sum(bias^2) so a class the data never confuses cannot run off.
    The biases are centred (mean 0: the softmax does not see a common shift). Returns
    (T, biases in class order). Raises ValueError as `fit_temperature` does.
    """
    t0 = fit_temperature(logits, gold)
    width = len(logits[0])
    n = len(logits)
    s = -math.log(t0)  # log(1/T)
    bias = [0.0] * width
    params = [s, *bias]
    m = [0.0] * (width + 1)
    v = [0.0] * (width + 1)
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        a = math.exp(params[0])
        grad = [0.0] * (width + 1)
        for row, g in zip(logits, gold, strict=True):
            z = [a * x + b for x, b in zip(row, params[1:], strict=True)]
            top = max(z)
            e = [math.exp(x - top) for x in z]
            total = sum(e)
            p = [x / total for x in e]
            # d NLL / d z_c = p_c - [c == g]; z_c = a x_c + b_c
            da = sum((p[c] - (c == g)) * row[c] for c in range(width))
            grad[0] += da * a / n
            for c in range(width):
                grad[c + 1] += (p[c] - (c == g)) / n
        for c in range(width):
            grad[c + 1] += 2 * ridge * params[c + 1]
        for k in range(width + 1):
            m[k] = b1 * m[k] + (1 - b1) * grad[k]
            v[k] = b2 * v[k] + (1 - b2) * grad[k] ** 2
            params[k] -= lr * (m[k] / (1 - b1**step)) / (math.sqrt(v[k] / (1 - b2**step)) + eps)
        centre = sum(params[1:]) / width
        params[1:] = [b - centre for b in params[1:]]
    return 1.0 / math.exp(params[0]), [round(b, 6) for b in params[1:]]


def calibrate(
    logits: Sequence[Sequence[float]], gold: Sequence[int], *, fitted_on: str = ""
) -> Calibration:
    """`fit_temperature` with its NLL before and after, as a Calibration to store."""
    t = fit_temperature(logits, gold)
    return Calibration(
        temperature=round(t, 6),
        fitted_on=fitted_on,
        n=len(logits),
        nll_before=round(mean_nll(logits, gold, 1.0), 6),
        nll_after=round(mean_nll(logits, gold, t), 6),
    )


def write_calibration(folder: str | Path, cal: Calibration) -> Path:
    """Write `cal` to folder/calibration.json; returns the path."""
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(json.dumps(asdict(cal), indent=2) + "\n", encoding="utf-8")
    return path


def read_calibration(folder: str | Path) -> Calibration | None:
    """The folder's calibration, or None when it has no calibration.json.

    Raises ValueError for a file that is not a JSON object with a positive,
    finite `temperature` (a broken file is an error to fix, not a reason to
    serve raw scores quietly).
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); refit it with `fleet train`") from e
    t = raw.get("temperature") if isinstance(raw, dict) else None
    if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{path}: 'temperature' must be a positive number, got {t!r}")
    known = {k: raw[k] for k in ("method", "fitted_on", "n", "nll_before", "nll_after") if k in raw}
    return Calibration(temperature=float(t), **known)


def scale_logits(logits: Any, cal: Calibration | None) -> Any:
    """`logits / T` for a fitted calibration, `logits` unchanged for None (any tensor/array)."""
    return logits if cal is None else logits / cal.temperature


def calibration_output(cal: Calibration | None) -> dict[str, Any]:
    """What a result's `output` says about its confidence: the temperature applied, or that
    none was (with what to do about it)."""
    if cal is None:
        return {"calibrated": False}
    return {"calibrated": True, "temperature": cal.temperature}
