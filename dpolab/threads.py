"""Thread-count control for small tensor work."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting afterwards.

    For tensors of a few to a few hundred elements (the bandit's objectives, the DID toy's
    (M, M) fits) the thread pool's start-up costs far more than the arithmetic: measured
    ~30-100x slower on 2 cores, milliseconds per call on a busy machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
