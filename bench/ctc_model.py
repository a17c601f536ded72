"""CTC speech models with random weights, at real shapes, for tests and benchmarks.

No CTC checkpoint installs offline here (see docs/architecture.md for the real
ones a ladder names: facebook/wav2vec2-base-960h, ...). A model built from a
transformers `Wav2Vec2Config` with random weights costs the real compute and
memory; its text is meaningless. It is saved as a complete model folder
(config, safetensors weights, a character vocabulary in the layout of
facebook/wav2vec2-base-960h, tokenizer and feature extractor configs) that
`AutoModelForCTC` and `AutoProcessor` load like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# facebook/wav2vec2-base-960h's vocabulary: blank (<pad>) first, "|" between words.
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]

# Shapes: `base` is facebook/wav2vec2-base(-960h) (94M parameters, near Whisper
# base's 73M); `small` a half-width, half-depth encoder (14M, below tiny.en's 38M);
# `test` a tiny one for unit tests.
SHAPES: dict[str, dict[str, Any]] = {
    "base": {},
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "conv_dim": (384,) * 7,
    },
    "test": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16,) * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
}


def build_ctc_model(
    folder: Path,
    *,
    shape: str = "test",
    seed: int = 0,
    blank_bias: float = 0.0,
    attention_mask: bool = False,
    **config: Any,
) -> Path:
    """A Wav2Vec2ForCTC with random weights saved into `folder` with its
    processor (Wav2Vec2CTCTokenizer over VOCAB + Wav2Vec2FeatureExtractor at
    16 kHz, zero-mean unit-variance input). Returns `folder`; an existing
    model folder is kept as it is.

    `shape` picks SHAPES[shape]; `config` overrides Wav2Vec2Config fields (e.g.
    num_hidden_layers=0 for a model whose every frame sees only its neighbours).
    `blank_bias` is added to the output layer's blank logit: like a trained CTC
    model, most frames then emit blank. `attention_mask` sets
    feat_extract_norm="layer" and makes the processor return an attention mask
    (wav2vec2-large-lv60 style); else group norm and zero padding (wav2vec2-base).
    """
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    )
    fields: dict[str, Any] = {
        **SHAPES[shape],
        "vocab_size": len(VOCAB),
        "pad_token_id": 0,
        "ctc_loss_reduction": "mean",
        "feat_extract_norm": "layer" if attention_mask else "group",
        "do_stable_layer_norm": attention_mask,
        **config,
    }
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**fields)).eval()
    with torch.no_grad():
        model.lm_head.bias[0] += blank_bias
    model.save_pretrained(folder)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
