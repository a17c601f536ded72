"""The data the fleet ships, and the one way to find it: `data_path(name)`.

tasks.toml (the bundled task config), the label prototypes and verbalizers,
the training sets of the bundled classifiers, the evaluation sets (`eval/`,
written separately from the training files, see eval/README.md) and the demo
samples. Every reader in every layer goes through `data_path`, so the files
can move without a hunt for the places that spell their folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(name: str | Path) -> Path:
    """The bundled file `name` (relative to this folder, e.g. "tasks.toml" or
    "eval/intent_eval.jsonl"), as a path on disk.

    The path is returned whether or not the file exists: callers that accept a
    user's path as well decide what a missing file means (and say where they
    looked). Raises ValueError for an absolute `name` or one that climbs out of
    the folder ("../x"): only bundled files are found here.
    """
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{str(name)!r} is not a bundled data file name (relative, no '..')")
    return Path(str(resources.files(__name__).joinpath(*rel.parts)))
