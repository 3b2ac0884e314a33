"""SIGTERM / SIGINT while training: finish the step, write last.pt, stop with a message."""
from __future__ import annotations

import signal
from typing import Optional

from .errors import OkdError


class Interrupted(OkdError):
    """SIGTERM/SIGINT arrived: the current step was finished and last.pt written."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} {where}; last.pt is written: rerun the same command to continue")


class StopSignals:
    """Context manager recording SIGTERM/SIGINT in ``received``; a second Ctrl-C stops at once."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
