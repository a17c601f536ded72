"""Models by name: a ladder tier's `path` may be a Hugging Face id.

    path = "intent-minilm"                       a folder under FLEET_MODELS_DIR
    path = "/models/mistral-7b-instruct"         an absolute folder
    path = "org/name"  (+ revision = "...")      a Hugging Face model, read from the
                                                 Hugging Face cache (HF_HOME) only

A folder that exists wins over a hub id of the same spelling. Workers resolve
with local files only (`snapshot_download(..., local_files_only=True)`): no
network at start-up, and a model not in the cache is `ModelNotCached`, whose
message names `fleet models pull`. `fleet models pull` (`pull`) is the one
place that downloads, on a machine that can reach the hub: safetensors weights,
configuration and tokenizer files only (no pickled weights, no Python code:
`trust_remote_code` is never enabled anywhere in the fleet).

Every resolved model has a revision, recorded on each result: the snapshot's
commit hash for a hub model, `sha256:<hex>` over the file names and contents of
a local folder (computed once per process and folder).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.taskconfig import TierSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What `fleet models pull` fetches: weights as safetensors, configuration, tokenizer.
ALLOW = [
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "tokenizer*",
    "vocab*",
    "merges*",
]
_hashes: dict[tuple[str, int], str] = {}


class ModelNotCached(RuntimeError):
    """A tier's model is neither a folder nor in the Hugging Face cache."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the folder to load
    # Snapshot commit, or sha256:<hex> of a local folder (None: not hashed yet, see
    # resolve_tier's hash_folder).
    revision: str | None
    hub_id: str | None = None


def hub_cache() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface")
    return Path(home) / "hub"


def hub_id(tier: TierSpec, models_dir: Path) -> str | None:
    """The Hugging Face id a tier names, or None when its path is a folder."""
    p = Path(tier.path).expanduser()
    if p.is_absolute() or (models_dir / p).exists() or tier.path.startswith(("./", "../", "~")):
        return None
    return tier.path if HUB_ID.match(tier.path) else None


def tier_revision(tier: TierSpec) -> str | None:
    """The `revision` a tier pins (a branch, tag or commit), if any."""
    rev = tier.options.get("revision")
    return str(rev) if rev is not None else None


def folder_revision(folder: Path) -> str:
    """sha256 over the relative names and contents of a folder's files (links
    followed, hidden files skipped), in name order: the same weights give the
    same revision wherever they are copied."""
    key = (str(folder.resolve()), int(folder.stat().st_mtime_ns))
    if key in _hashes:
        return _hashes[key]
    digest = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith("."):
                path = Path(root) / name
                files.append((path.relative_to(folder).as_posix(), path))
    for rel, path in sorted(files):
        digest.update(rel.encode("utf-8") + b"\0")
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    _hashes[key] = "sha256:" + digest.hexdigest()
    return _hashes[key]


def _cached_snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            str(
                snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=hub_cache(),
                    local_files_only=True,
                )
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        at = f" at revision {revision}" if revision else ""
        raise ModelNotCached(
            f"Hugging Face model {repo}{at} is not in the cache {hub_cache()}: run "
            "`fleet models pull` on a machine that can reach the hub (with the same "
            "HF_HOME), or copy that cache here"
        ) from e


def check_weights(folder: Path, *, fix: str, require: bool) -> None:
    """Raise ModelNotCached when `folder` cannot be loaded whole: a file link
    whose target is missing (an interrupted download leaves links to absent
    blobs), no `*.safetensors` weights while `require`, a shard its index
    names that is absent, or a weights file whose header or size is wrong (a
    truncated download). Reads only the safetensors headers (safetensors'
    `safe_open`). The message names the file and ends with `fix`."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.exists():
            raise ModelNotCached(
                f"{path} links to {os.readlink(path)}, which is missing (an interrupted "
                f"download); {fix}"
            )
    weights = sorted(folder.glob("*.safetensors"))
    if require and not weights:
        raise ModelNotCached(f"{folder} has configuration but no weights (*.safetensors); {fix}")
    for index in folder.glob("*.safetensors.index.json"):
        import json

        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelNotCached(f"{index} is unreadable ({e}); {fix}") from e
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise ModelNotCached(f"{folder / shard}, named by {index.name}, is missing; {fix}")
    for path in weights:
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelNotCached(
                f"{path} ({path.stat().st_size} bytes) is truncated or damaged ({e}); {fix}"
            ) from e


def resolve_tier(tier: TierSpec, models_dir: Path, *, hash_folder: bool = True) -> ResolvedModel:
    """The folder and revision of a tier's model, from local files only.

    With `hash_folder` false a local folder's revision is left None (hashing
    reads every file: a worker hashes only the tier it loads).
    Raises ModelNotCached for a hub id missing from the cache, a cached
    snapshot that is incomplete (no config.json, no weights, a dangling link,
    truncated weights: see check_weights), and for a folder without
    config.json or with damaged weights (the message says what to run)."""
    repo = hub_id(tier, models_dir)
    if repo is not None:
        path = _cached_snapshot(repo, tier_revision(tier))
        fix = (
            f"the cached snapshot of Hugging Face model {repo} is incomplete: run "
            "`fleet models pull` again (with the same HF_HOME)"
        )
        if not (path / "config.json").is_file():
            raise ModelNotCached(f"{path} has no config.json; {fix}")
        check_weights(path, fix=fix, require=True)
        return ResolvedModel(path, path.name, repo)
    p = Path(tier.path).expanduser()
    path = p if p.is_absolute() else models_dir / p
    if not (path / "config.json").is_file():
        raise ModelNotCached(
            f"no model at {path}. Run `fleet models prepare` for the bundled models, "
            "`fleet models pull` for a Hugging Face id (org/name), or point the ladder's "
            "path at a model folder"
        )
    check_weights(
        path,
        fix="copy or prepare the model again (`fleet models prepare` for the bundled ones)",
        require=False,
    )
    return ResolvedModel(path, folder_revision(path) if hash_folder else None)


def pull(repo: str, revision: str | None, *, echo: Callable[[str], None] = print) -> ResolvedModel:
    """Download a model into the Hugging Face cache: safetensors, configuration and
    tokenizer files only. Raises ModelNotCached when the repository has no
    safetensors weights (pickled weights are never fetched)."""
    from huggingface_hub import snapshot_download

    path = Path(
        str(snapshot_download(repo, revision=revision, cache_dir=hub_cache(), allow_patterns=ALLOW))
    )
    if not any(path.glob("*.safetensors")):
        raise ModelNotCached(
            f"{repo} has no safetensors weights; the fleet loads safetensors only (convert the "
            "weights with transformers' save_pretrained(safe_serialization=True) into a folder "
            "and point the ladder's path at it)"
        )
    echo(f"{repo}: {path.name} in {hub_cache()}")
    return ResolvedModel(path, path.name, repo)
