"""Files written whole or not at all: a temporary file in the same folder, then a rename.

A reader (or a run resumed after kill -9) sees the old file or the complete new one, never a
part. The temporary name carries the process id, so ranks of one torchrun job writing the
same shared cache file do not collide.
"""

from __future__ import annotations

import os
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8), flushed to disk before the rename."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def save_tensors(tensors: dict, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.save_file, creating the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
