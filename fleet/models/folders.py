"""Model folders other users can read.

Workers often run as another user than the one who prepared or trained their
models (the Dockerfile's and k8s' `runAsUser: 10001`, a systemd unit's `User=`).
`tempfile.mkdtemp` makes a 0700 folder and safetensors writes weights 0600, so
every folder the fleet writes models into passes through `make_readable`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it: set and restored)."""
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def make_readable(folder: Path, *, umask: int | None = None) -> None:
    """Give `folder`, its subfolders and files the modes a fresh `mkdir` and file
    would get under `umask` (default: the process umask): 0o777 & ~umask for
    folders, 0o666 & ~umask for files (0755 / 0644 under the usual 022; a 077
    umask keeps them private). Links are left alone. Raises OSError when a mode
    cannot be set."""
    mask = current_umask() if umask is None else umask
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            path = Path(root) / d
            if not path.is_symlink():
                path.chmod(0o777 & ~mask)
        for f in files:
            path = Path(root) / f
            if not path.is_symlink():
                path.chmod(0o666 & ~mask)
