"""Stopping a training run cleanly: SIGINT/SIGTERM become a flag checked between steps, so progress is
saved consistently before the run ends."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so progress is saved consistently."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
