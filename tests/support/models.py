"""Tiny real models for tests: a randomly initialised BERT classifier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fleet.models.finetune import INTENT_LABELS


def build_tiny_classifier(
    folder: Path,
    *,
    labels: Sequence[str] = INTENT_LABELS,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A real BERT sequence classifier with random weights (MiniLM's tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fleet.models.catalogue import minilm_path

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
