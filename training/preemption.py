"""Stopping on a signal: SIGTERM (a cluster scheduler's pre-emption) or SIGINT (Ctrl-C) asks the
run to save a checkpoint at the end of the current step and end there.

The handler only records the signal; the trainer all-reduces what every rank received after each
step, so all ranks stop at the same step (also those the signal did not reach). A second signal
stops at once, for a run that hangs in its checkpoint: the handler raises `Interrupted` (a
KeyboardInterrupt), which the trainer turns into one log line and the exit code of that signal
(130 for SIGINT, 143 for SIGTERM), without a traceback. If that happens during a checkpoint save,
the save is abandoned in its staging folder, which carries the run's stamp and is removed at the
next start (training/checkpoint.py); the steps the save routine must not be cut in (creating and
stamping the staging folder, the renames that publish a checkpoint or move one to the trash) run
inside `deferred()`, where a second signal takes effect at the end of the block.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """A second signal arrived: stop now. `signum` is that signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Deferral:
    depth = 0  # > 0 inside `deferred()`
    pending: int | None = None  # a second signal that arrived meanwhile


_deferral = _Deferral()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a second signal does not cut: it raises `Interrupted` when the block ends.
    Only the handlers of `StopRequest` defer; Python's default SIGINT handler raises at once."""
    _deferral.depth += 1
    try:
        yield
    finally:
        _deferral.depth -= 1
    if _deferral.depth == 0 and _deferral.pending is not None:
        signum, _deferral.pending = _deferral.pending, None
        raise Interrupted(signum)


class StopRequest:
    """Installs the SIGTERM/SIGINT handlers for the duration of a training loop.

    `signum` is the first signal received; the run then ends with exit code 128 + signum (143 for
    SIGTERM, 130 for SIGINT, the shell's convention) so that `set -e` scripts and schedulers see
    an interrupted run, not a finished one. A second signal raises `Interrupted(second signum)`
    (see the module docstring); the exit code is then 128 + that signal's number.
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
        if self.signum is None:
            self.signum = signum
        elif _deferral.depth:
            _deferral.pending = signum
        else:
            raise Interrupted(signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        _deferral.pending = None
