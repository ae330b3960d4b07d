"""Files and folders written whole or not at all: a temporary sibling, then a rename.

A reader (or a run resumed after kill -9) sees the old file or folder or the complete new
one, never a part and never none. The temporary name carries the process id, so ranks of one
torchrun job writing the same shared cache file do not collide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


def read_tensors(path: str | Path | None) -> dict | None:
    """The tensors of a file `save_tensors` wrote, or None when there is no such file or it
    cannot be read (cut short, foreign): a cache miss, recomputed rather than trusted."""
    from safetensors.torch import load_file

    if path is None or not Path(path).exists():
        return None
    try:
        return load_file(str(path))
    except Exception:  # any unreadable file is a miss
        return None


@contextmanager
def write_dir(dest: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Fill a folder that appears at `dest` whole: yields an empty temporary sibling folder;
    when the block ends without an error its files are flushed to disk and it takes the place
    of `dest`. An existing `dest` is swapped out in one atomic exchange (Linux renameat2), so
    at every instant `dest` holds the old or the new contents; where the exchange is not
    available the old folder is renamed aside first and :func:`recover_dir` brings it back
    after a kill between the two renames. On an error the temporary folder is removed and
    `dest` is untouched. With `keep_existing`, an existing `dest` wins (another process
    finished the same work first) and the new folder is dropped."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.tmp",
                                dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if not dest.exists():
            os.replace(tmp, dest)
        elif keep_existing:
            shutil.rmtree(tmp)
        elif _exchange(tmp, dest):
            shutil.rmtree(tmp)  # now holds the old contents
        else:
            old = _aside(dest)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(dest: str | Path) -> None:
    """Undo a folder swap killed between its two renames: `dest` missing, the old folder
    set aside beside it. Temporary folders of killed writers are left for their owner's
    next write to ignore (their names never collide with `dest`)."""
    dest = Path(dest)
    if dest.exists():
        return
    aside = _aside(dest)
    if aside.exists():
        os.replace(aside, dest)


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not sync folders
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
