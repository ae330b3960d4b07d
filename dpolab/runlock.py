"""One process at a time in a run directory: an OS-level lock held for the whole run.

`hold(run_dir)` takes an exclusive `fcntl.flock` on `run_dir/run.lock` without waiting and
writes the holder's pid into it. A second run into the same directory (or a `--resume` of it
while it runs) fails at once with a UserError that names the directory and the holder's pid,
instead of two processes interleaving checkpoints and metrics lines. The kernel drops the lock
when its holder exits in any way (kill -9 included), so a stale lock never blocks a resume;
the file itself stays (removing it would let a third process lock a different inode).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dpolab.errors import UserError

LOCK_NAME = "run.lock"


class RunLock:
    """An exclusive lock on one run directory, held until :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{self.run_dir}: cannot use as a run directory: "
                            f"{err.strerror or err}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(self._fd)
            os.close(self._fd)
            self._fd = None
            who = f"process {holder}" if holder else "another process"
            raise UserError(f"{self.run_dir}: the run directory is in use by {who} "
                            f"(a dpolab run holds {self.path}); wait for it to finish or "
                            f"stop it, or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # a lock object dropped without release() must not keep the directory
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


@contextmanager
def hold(run_dir: str | Path, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold the run directory's lock for the block (`enabled=False`: no lock, e.g. on the
    non-main ranks of a torchrun job, which share rank 0's directory)."""
    lock = RunLock(Path(run_dir)) if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
