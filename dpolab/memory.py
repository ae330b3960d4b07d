"""How a CPU training process gets its memory from the C library.

PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold
(128 KiB at start, raised dynamically up to 32 MiB) with a fresh private mapping and unmaps it
on free; every page of such a block is then zeroed by the kernel on first touch (a page fault).
A training step allocates and frees the same activations, gradients and head chunks of many
MiB every time, so with the defaults each step pays for faulting in hundreds of MiB again:
on SmolLM2-135M full fine-tuning (2 pairs x 192 tokens, 2 cores) that was about a sixth of
the step, visible as system time and as `aten::fill_` in the profiler.

:func:`reuse_freed_blocks` raises the mmap threshold to 256 MiB and the heap trim threshold
to 1 GiB for this process, so freed blocks stay in the heap and the next step reuses pages
that are already mapped. Peak RSS stays within the run's own high-water mark of live tensors
plus what the heap keeps between steps; benchmarks/vs_trl.py measures both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

_applied: dict | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - raises AttributeError outside glibc
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_blocks(*, mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30,
                       top_pad: int = 256 << 20) -> dict:
    """Keep freed tensor memory mapped for reuse (see the module docstring). Idempotent; a
    no-op off glibc. Returns {"applied": bool, "mmap_threshold": int | None,
    "trim_threshold": int | None}."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    ok = (libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
          and bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
          and bool(libc.mallopt(M_TOP_PAD, int(top_pad))))
    _applied = {"applied": ok, "mmap_threshold": int(mmap_threshold) if ok else None,
                "trim_threshold": int(trim_threshold) if ok else None,
                "top_pad": int(top_pad) if ok else None}
    return _applied
