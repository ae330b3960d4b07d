"""Stopping a run cleanly when asked to: SIGTERM (a scheduler's preemption, `kill`, torchrun
passing on its own stop) and SIGHUP (the terminal closed).

While the training loop runs, `StopSignals` turns either signal into a request instead of the
end of the process: the loop finishes the step it is in, writes a checkpoint, says where it is
and how to resume, and ends with `Stopped` (the command exits 128 + the signal number: 143,
129). A second signal of the same kind ends the process at once, as usual. Under torchrun the
signal may reach one rank only, so the loop asks every rank at each step boundary
(`Distributed.all_max` of the signal numbers) and all stop after the same step.
Outside the loop (loading, the reference pass, the final export) the signals keep their usual
effect: there is nothing to save there that a resume would not redo.
"""

from __future__ import annotations

import os
import signal
import threading

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class StopSignals:
    """A context manager: inside it, while `armed`, SIGTERM and SIGHUP set `received` (the
    first signal's number; 0 for none); unarmed they do what they did before (by default end
    the process). Handlers are installed only in the main thread (Python runs signal handlers
    there alone), not for a signal ignored (SIGHUP under nohup stays ignored), and the
    previous ones restored on exit."""

    def __init__(self):
        self.received = 0
        self.armed = False  # the training loop arms it
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in NAMES:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig in list(self._previous):
            signal.signal(sig, self._before(sig))
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        signal.signal(signum, self._before(signum))  # a second one ends the process
        if not self.armed:  # as if this handler were not there
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or signum

    def _before(self, sig: int):
        handler = self._previous.get(sig)
        return signal.SIG_DFL if handler is None else handler  # None: not set from Python
