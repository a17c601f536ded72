"""Real out-of-memory on a real GPU: the runtime halves its budget, then steps
down the ladder. Skipped without CUDA.

The device is made small on purpose: `torch.cuda.set_per_process_memory_fraction`
caps this process, and a ladder of random-weight BERT classifiers (large, then
small) with long inputs makes the large tier run out of memory for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _bert(folder: Path, *, hidden: int, layers: int, heads: int) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fleet.models.catalogue import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=512,
        num_labels=4,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_real_oom_downshifts(tmp_path):
    from config.taskconfig import TaskSpec, TierSpec
    from workers.adapters.base import Source
    from workers.adapters.sequence_classify import SequenceClassifyAdapter
    from workers.runtime import ModelRuntime

    big = _bert(tmp_path / "big", hidden=2048, layers=24, heads=16)  # ~1.3B params: ~2.6 GB fp16
    small = _bert(tmp_path / "small", hidden=256, layers=4, heads=4)
    free, total = torch.cuda.mem_get_info()
    # Leave room for the large model's weights but not for its activations at any batch.
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3.2 * 2**30 / total))
    spec = TaskSpec(
        "t",
        "sequence_classify",
        "conversation",
        (
            TierSpec(
                name="big",
                path=str(big),
                dtype="float16",
                max_length=512,
                max_batch_tokens=512 * 256,
            ),
            TierSpec(
                name="small",
                path=str(small),
                dtype="float16",
                max_length=512,
                max_batch_tokens=512 * 64,
            ),
        ),
    )
    rt = ModelRuntime(
        spec, SequenceClassifyAdapter(), models_dir=tmp_path, device="cuda:0", start_at=0
    )
    rt.start()
    words = "the quarterly report needs another careful review " * 80
    sources = [
        Source(i, "conversation", f"e{i}", {"messages": [{"role": "user", "content": words}]})
        for i in range(256)
    ]
    results, stats = rt.run(sources)
    print(
        f"\nOOMs {stats.ooms}, downshifts {stats.downshifts}, final tier {rt.tier}, budget {rt.budget.tokens}"
    )
    assert stats.ooms >= 1
    assert all(r.error is None for r in results)
    assert {r.tier for r in results} <= {0, 1}
    if stats.downshifts:
        assert rt.tier == 1 and results[-1].model_name == "small"
