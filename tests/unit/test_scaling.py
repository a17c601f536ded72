"""A temperature with a bias per label (`workers.calibration.fit_scaling`), and the
zero-shot and LLM adapters serving it."""

from __future__ import annotations

import math
import random

import pytest

from workers.calibration import biased_nll, fit_scaling, fit_temperature, mean_nll


def _shifted(n: int = 600, seed: int = 0) -> tuple[list[list[float]], list[int]]:
    """Three classes whose third class's score sits 1.5 below the others' scale: the
    shape of a zero-shot label whose prototypes are far from every text."""
    rng = random.Random(seed)
    logits, gold = [], []
    for _ in range(n):
        g = rng.randrange(3)
        row = [rng.gauss(0, 1) for _ in range(3)]
        row[g] += 2.0
        row[2] -= 1.5
        logits.append([3 * v for v in row])
        gold.append(g)
    return logits, gold


def test_a_bias_per_label_fits_what_one_temperature_cannot() -> None:
    logits, gold = _shifted()
    t_only = fit_temperature(logits, gold)
    t, bias = fit_scaling(logits, gold)
    assert biased_nll(logits, gold, t, bias) < mean_nll(logits, gold, t_only) - 0.1
    assert bias[2] > bias[0] and bias[2] > bias[1]  # the under-scored class is lifted
    assert abs(sum(bias)) < 1e-6  # centred
    assert t > 0


def test_no_shift_leaves_the_biases_near_zero() -> None:
    rng = random.Random(1)
    logits, gold = [], []
    for _ in range(400):
        g = rng.randrange(3)
        row = [rng.gauss(0, 1) for _ in range(3)]
        row[g] += 2.0
        logits.append(row)
        gold.append(g)
    _, bias = fit_scaling(logits, gold)
    assert max(abs(b) for b in bias) < 0.3


def test_fit_scaling_refuses_what_fit_temperature_refuses() -> None:
    with pytest.raises(ValueError):
        fit_scaling([], [])
    with pytest.raises(ValueError):
        fit_scaling([[1.0, 2.0]], [3])


def test_zero_shot_refuses_a_bias_for_a_label_it_lacks() -> None:
    from workers.adapters.zero_shot import ZeroShotAdapter

    with pytest.raises(ValueError, match="label_bias names labels the task lacks: nope"):
        ZeroShotAdapter(labels={"a": "x", "b": "y"}, label_bias={"nope": 1.0})
    adapter = ZeroShotAdapter(labels={"a": "x", "b": "y"}, label_bias={"b": 0.5})
    assert adapter.label_bias == [0.0, 0.5]


def test_llm_classify_serves_the_fitted_scaling_instead_of_the_prior() -> None:
    from workers.adapters.llm_classify import LLMClassifyAdapter

    labels = {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="label_bias names labels the task lacks"):
        LLMClassifyAdapter(labels=labels, label_bias={"c": 1.0})
    adapter = LLMClassifyAdapter(labels=labels, temperature=2.0, label_bias={"b": 1.0})
    probs, raw = adapter.label_distribution([math.log(0.8), math.log(0.2)])
    assert raw == pytest.approx([0.8, 0.2])
    z = [math.log(0.8) / 2.0, math.log(0.2) / 2.0 + 1.0]
    want = [math.exp(v) / sum(math.exp(x) for x in z) for v in z]
    assert probs == pytest.approx(want)
    plain = LLMClassifyAdapter(labels=labels, calibrate=False, label_bias={"b": 1.0})
    assert plain.scaling is None  # calibrate = false serves the raw distribution


def test_per_label_takes_the_first_n_of_each_label_in_file_order() -> None:
    from fleet.cli.calibrate import first_per_label
    from fleet.models.labeled import Example

    rows = [Example(f"t{i}", "ab"[i % 2]) for i in range(7)] + [Example("c0", "c")]
    picked = first_per_label(rows, 2)
    assert [ex.text for ex in picked] == ["t0", "t1", "t2", "t3", "c0"]


def test_zero_shot_refuses_a_bias_it_would_not_apply(tmp_path) -> None:
    """label_bias scales the embedding method only: a tier read by NLI or an LLM refuses
    it when it loads instead of serving unscaled scores quietly."""
    import json

    from config.taskconfig import TierSpec
    from workers.adapters.zero_shot import ZeroShotAdapter

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    adapter = ZeroShotAdapter(labels={"a": "x", "b": "y"}, label_bias={"b": 0.5})
    tier = TierSpec(name="t", path="p", options={"method": "llm"})
    with pytest.raises(ValueError, match="label_bias scales the embedding method"):
        adapter.load(tier, str(tmp_path), "cpu")
