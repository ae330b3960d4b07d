"""Files and folders written whole or not at all: a temporary sibling, then a rename.

A reader (or a run resumed after kill -9) sees the old file or folder or the complete new
one, never a part and never none. The temporary name carries the process id and the host
(`NAME.PID@HOST.tmp`), so ranks of one torchrun job writing the same shared cache file do not
collide, and what a killed writer left is told from what a live one is writing
(:func:`temp_owner`, dpolab.cachedir.remove_orphans).

Cache files (`save_tensors`) record their kind and a digest of their tensors; the one reader,
:func:`read_tensors`, returns them only when both check out, so a damaged, foreign or older
file is a cache miss said in one line (:func:`miss`), never data.

A write that fails for want of room or permission (ENOSPC, EFBIG, EROFS, EACCES, ...) raises
:class:`WriteError`: one line naming the file and what happened (:func:`writing`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dpolab.errors import UserError

_HOST = re.sub(r"[@/]", "_", socket.gethostname()) or "localhost"
# NAME.PID@HOST.tmp (write_dir's folders .NAME.RANDOM.PID@HOST.tmp); NAME.PID.tmp without
# the host from earlier dpolab versions.
_TMP_NAME = re.compile(r"\.(\d+)(?:@([^@/]*))?\.tmp$")
# A cache file's metadata: one entry, JSON with sorted keys ("kind", "blake2b", the caller's):
# safetensors writes several entries in a random order, and equal files must be equal bytes.
_META = "dpolab"


def tmp_sibling(path: Path) -> Path:
    """The temporary name under which this process writes `path`."""
    return path.with_name(f"{path.name}.{os.getpid()}@{_HOST}.tmp")


# ---------------------------------------------------------------------------------------
# Write failures


class WriteError(UserError):
    """`path` could not be written: `what` (no space left, read-only, ...)."""

    def __init__(self, path: str | Path, what: str):
        super().__init__(f"{path}: cannot write: {what}")
        self.path, self.what = Path(path), what


_WHAT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large", errno.EROFS: "read-only file system",
         errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
         errno.ENOTDIR: "a part of the path is a file, not a folder"}


def write_problem(err: BaseException, where: Path) -> str | None:
    """What stopped a write, in words, or None when `err` is not such a failure. The errno is
    read from the error or the ones it was raised from (torch.save into a Python file raises
    RuntimeError "unexpected pos" from the OSError), or from its text (safetensors: "(os
    error 28)"). A writer that lost its errno (torch.save given a path writes from C++)
    failing where no space is left (`where`: the partial write, not yet removed) is ENOSPC."""
    code = _errno_of(err)
    if code is None and re.search(r"unexpected pos|serializ|I/O error", str(err)):
        code = errno.ENOSPC if _free_bytes(where) < 1 << 20 else None
    if code not in _WHAT:
        return None
    what = _WHAT[code]
    if code == errno.EFBIG:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            what += f": the file-size limit of this process is {soft} bytes (ulimit -f)"
    return what


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _errno_of(err: BaseException) -> int | None:
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e))
        if m:
            return int(m.group(1) or m.group(2))
    return None


def _free_bytes(where: Path) -> int:
    for p in (where, *where.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return 1 << 62


@contextmanager
def writing(path: str | Path, tmp: Path | None = None) -> Iterator[None]:
    """Run a write of `path` (through the temporary sibling `tmp`, a file or a folder, removed
    on any error): a failure for want of room or permission becomes a WriteError naming the
    file (inside a folder `path`, the file being written), other errors pass unchanged."""
    path = Path(path)
    try:
        yield
    except WriteError:
        _remove(tmp)
        raise
    except BaseException as err:
        what = write_problem(err, tmp if tmp is not None else path)
        name = _failed_file(err, path, tmp) if what else path
        _remove(tmp)
        if what is None:
            raise
        raise WriteError(name, what) from None


def _failed_file(err: BaseException, path: Path, tmp: Path | None) -> Path:
    """The file whose write failed, named where it was going: the OSError's file name, or
    the newest file in the temporary folder (the one being written when it failed)."""
    named = next((Path(e.filename) for e in _chain(err)
                  if isinstance(e, OSError) and e.filename), None)
    if named is None and tmp is not None and tmp.is_dir():
        files = [p for p in tmp.rglob("*") if p.is_file()]
        named = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    if named is None or tmp is None:
        return named or path
    try:
        return path / named.relative_to(tmp) if tmp.is_dir() else path
    except ValueError:
        return named


def _remove(tmp: Path | None) -> None:
    if tmp is None:
        return
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Files and folders


def write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8), flushed to disk before the rename."""
    path = Path(path)
    tmp = tmp_sibling(path)
    with writing(path, tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return path


def sha256(path: Path) -> str:
    """The sha256 of a file's bytes (checkpoint files, converted model folders)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(tensors: dict) -> str:
    """blake2b over the tensors' names, dtypes, shapes and bytes, in name order: a cache
    file's checksum, and the weights' part of a cache key (reference.hash_parameters)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            flat = t.reshape(-1)
            if flat.stride(0) != 1:  # one element under any stride counts as contiguous
                flat = flat.clone(memory_format=torch.contiguous_format)
            h.update(flat.view(torch.uint8).numpy())  # the bytes, not a copy
    return h.hexdigest()


def save_tensors(tensors: dict, path: str | Path, *, kind: str,
                 metadata: dict[str, str] | None = None) -> Path:
    """A cache file: safetensors with its `kind` and the `digest` of its tensors recorded,
    so that :func:`read_tensors` can tell it whole and of the kind it expects."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = tmp_sibling(path)
    meta = json.dumps({**(metadata or {}), "kind": kind, "blake2b": digest(tensors)},
                      sort_keys=True)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={_META: meta})
        tmp.replace(path)
    return path


def read_tensors(path: str | Path | None, *, kind: str, on_miss=None) -> dict | None:
    """The tensors of a cache file of `kind` that `save_tensors` wrote, or None: no such file
    (silently), or one that cannot be read (cut short), is of another kind or of a dpolab
    that recorded no checksum, or whose tensors do not match their checksum (damaged), each
    said by :func:`miss` (the caller computes the file again), or by `on_miss(path, why)`
    where a file that is not what it should be cannot be computed again (a run's record)."""
    from safetensors import safe_open

    miss_ = on_miss or miss

    if path is None or not Path(path).exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # any unreadable file is a miss
        return miss_(path, f"cannot be read ({type(err).__name__})")
    if not isinstance(meta, dict) or "blake2b" not in meta:
        return miss_(path, "has no checksum (written by an earlier dpolab, or not by dpolab)")
    if meta.get("kind") != kind:
        return miss_(path, f"holds {meta.get('kind')!r}, not {kind!r}")
    if meta["blake2b"] != digest(tensors):
        return miss_(path, "its tensors do not match their recorded checksum (damaged)")
    return tensors


def miss(path: str | Path, why: str) -> None:
    """Say in one line that cache file `path` is not used (`why`) and will be computed again;
    once per torchrun job. Returns None, the reader's answer for a miss."""
    if os.environ.get("RANK", "0") == "0":
        print(f"dpolab: {path}: {why}; computing it again", file=sys.stderr, flush=True)
    return None


@contextmanager
def write_dir(dest: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Fill a folder that appears at `dest` whole: yields an empty temporary sibling folder;
    when the block ends without an error its files are flushed to disk and it takes the place
    of `dest`. An existing `dest` is swapped out in one atomic exchange (Linux renameat2), so
    at every instant `dest` holds the old or the new contents; where the exchange is not
    available the old folder is renamed aside first and :func:`recover_dir` brings it back
    after a kill between the two renames. On an error the temporary folder is removed and
    `dest` is untouched (a write failure is a WriteError naming the file). With
    `keep_existing`, an existing `dest` wins (another process finished the same work first)
    and the new folder is dropped."""
    dest = Path(dest)
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}@{_HOST}.tmp",
                                    dir=dest.parent))
    with writing(dest, tmp):
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


def recover_dir(dest: str | Path) -> None:
    """Undo a folder swap killed between its two renames: `dest` missing, the old folder
    set aside beside it. Temporary folders of killed writers are removed at the next start
    (dpolab.cachedir.remove_orphans; their names never collide with `dest`)."""
    dest = Path(dest)
    if dest.exists():
        return
    aside = _aside(dest)
    if aside.exists():
        os.replace(aside, dest)


def temp_owner(name: str) -> tuple[int, str | None, bool] | None:
    """(pid, host, whether that host is this one) of the writer whose temporary sibling is
    called `name`, or None when `name` is no such sibling. A name without a host (earlier
    dpolab versions) is this host's."""
    m = _TMP_NAME.search(name)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), m.group(2) in (None, _HOST)


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
