"""Progress for long commands: a tqdm bar with ETA and live metrics on a terminal, plain
log lines (one every `every` seconds and at the end) when stdout is not a TTY."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, every: float = 10.0):
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.n, self.t0, self.last = 0, time.monotonic(), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, n: int, **metrics: float) -> None:
        """Set the absolute position to n and show `metrics`."""
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.update(n - self.n)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        else:
            now = time.monotonic()
            if now - self.last >= self.every or n >= self.total:
                elapsed = now - self.t0
                eta = elapsed / max(n, 1) * (self.total - n)
                print(f"{self.desc}: {n}/{self.total}  elapsed {elapsed:.0f}s  eta {eta:.0f}s"
                      + (f"  {text}" if text else ""), file=sys.stderr, flush=True)
                self.last = now
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
