"""Stopping on a signal: SIGTERM (a cluster scheduler's pre-emption) or SIGINT (Ctrl-C) asks the
run to save a checkpoint at the end of the current step and end there.

The handler only records the signal; the trainer all-reduces what every rank received after each
step, so all ranks stop at the same step (also those the signal did not reach). A second signal
stops at once (KeyboardInterrupt), for a run that hangs in its checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Installs the SIGTERM/SIGINT handlers for the duration of a training loop.

    `signum` is the first signal received; the run then ends with exit code 128 + signum (143 for
    SIGTERM, 130 for SIGINT, the shell's convention) so that `set -e` scripts and schedulers see
    an interrupted run, not a finished one.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no handler
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
