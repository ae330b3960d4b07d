"""The cache ($DPOLAB_CACHE): where it is, whether it can take a file about to be computed,
the leftovers of killed writers in it and in a run directory, and the checksums of the
model folders converted into it.

The cache holds the converted default model (models/), the reference log-probs (reference/)
and the last_layer scope's body states (states/); each file is computed once and read back
only when it checks out (dpolab.atomic.read_tensors). A warm cache is only read, so it may be
read-only. Before a file is computed, :func:`require` checks that its place can take it and
names $DPOLAB_CACHE when it cannot, so that no pass runs only to end in a write error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from dpolab import atomic
from dpolab.errors import UserError

_SPARE = 1 << 20  # bytes left free beyond an estimate (headers, metadata, rounding)
_FOREIGN_AGE_S = 24 * 3600  # another host's temporary sibling untouched this long is an orphan


def root() -> Path:
    """`$DPOLAB_CACHE` if set, else `~/.cache/dpolab`; a UserError when that is a file."""
    path = Path(os.environ.get("DPOLAB_CACHE") or Path.home() / ".cache" / "dpolab")
    if path.exists() and not path.is_dir():
        raise UserError(f"{_named(path)} is not a folder; set DPOLAB_CACHE to a folder "
                        f"dpolab may write in")
    return path


def _named(path: Path) -> str:
    if os.environ.get("DPOLAB_CACHE"):
        return f"$DPOLAB_CACHE={path}"
    return f"the dpolab cache {path} ($DPOLAB_CACHE is not set)"


def require(path: Path, nbytes: int, what: str) -> None:
    """Before computing `what`, to be stored at `path` in the cache (about `nbytes`): a
    UserError naming the cache when `path`'s folder cannot be made or written in, or when its
    disk has not `nbytes` (and 1 MiB) free."""
    cache, folder = root(), Path(path).parent
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as err:
        why = atomic.write_problem(err, folder) or (err.strerror or str(err)).lower()
        raise UserError(f"{_named(cache)}: cannot store {what} in {folder}: {why}; set "
                        f"DPOLAB_CACHE to a folder dpolab may write in (a read-only one "
                        f"serves once it holds every file a run reads)") from None
    free = shutil.disk_usage(folder).free
    if free < nbytes + _SPARE:
        raise UserError(f"{_named(cache)}: {what} need about {_size(nbytes)} in {folder} "
                        f"(and {_size(_SPARE)} kept spare), but its disk has {_size(free)} "
                        f"free; free space there or set DPOLAB_CACHE to another folder")


def _probe(folder: Path) -> None:
    """Create and remove a file in `folder` (OSError when it cannot be written in)."""
    probe = atomic.tmp_sibling(folder / ".probe")  # a killed probe is an orphan like any other
    probe.open("w").close()
    probe.unlink()


def remove_orphans(run_dir: Path) -> None:
    """At the start of a run: remove the temporary siblings that killed writers left in the
    run directory, its checkpoints/ and pairs/ and the cache's folders, and say so when
    there were any.
    A live process's (another run sharing the cache, another rank) are left alone."""
    cache = root()
    folders = [run_dir, run_dir / "checkpoints", run_dir / "pairs", cache]
    if cache.is_dir():
        folders += sorted(p for p in cache.iterdir() if p.is_dir() and not p.is_symlink())
    count = size = 0
    for folder in folders:
        try:
            entries = [Path(e.path) for e in os.scandir(folder)]
        except OSError:  # no such folder (yet)
            continue
        for path in entries:
            owner = atomic.temp_owner(path.name)
            if owner is None or not _orphan(path, *owner):
                continue
            n = sum(s.st_size for s in _stats(path))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if not os.path.lexists(path):
                count, size = count + 1, size + n
    if count:
        print(f"dpolab: removed {count} temporary file(s) or folder(s), {_size(size)}, that "
              f"stopped writers left in {run_dir} and {cache}", file=sys.stderr, flush=True)


def _orphan(path: Path, pid: int, host: str | None, this_host: bool) -> bool:
    """A temporary sibling of a process of this host that no longer runs, or of another
    host's untouched for a day (its processes cannot be asked)."""
    if not this_host:
        return time.time() - max(s.st_mtime for s in _stats(path)) > _FOREIGN_AGE_S
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _stats(path: Path) -> list[os.stat_result]:
    """lstat of `path` and of everything below it (none when it went meanwhile)."""
    try:
        return [path.lstat()] + ([p.lstat() for p in path.rglob("*")] if path.is_dir() else [])
    except OSError:
        return [os.stat_result((0,) * 10)]


# ---------------------------------------------------------------------------------------
# Converted model folders

RECORD = "dpolab-sha256.json"  # a converted folder's files and their sha256, at conversion
_verified: dict[Path, tuple[int, int]] = {}  # folders checked by this process: weights' stat


def record_folder(folder: Path) -> None:
    """Write into `folder` (before it is renamed into place) the sha256 of each of its files."""
    atomic.write_text(folder / RECORD, json.dumps(
        {p.name: atomic.sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}, indent=1))


def folder_intact(folder: Path, weights: str = "model.safetensors") -> bool:
    """Whether every file `folder`'s record names still has its recorded sha256 (once per
    process while the weights file is unchanged). No record (an earlier dpolab) or a changed
    or missing file is a miss, said in one line."""
    stat = (folder / weights).stat()
    if _verified.get(folder) == (stat.st_size, stat.st_mtime_ns):
        return True
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        atomic.miss(folder, f"has no {RECORD} (converted by an earlier dpolab)")
        return False
    for name, expected in record.items():
        path = folder / name
        if not path.is_file() or atomic.sha256(path) != expected:
            atomic.miss(path, "is missing or does not match its sha256 recorded at conversion")
            return False
    _verified[folder] = (stat.st_size, stat.st_mtime_ns)
    return True


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 10 * 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"
