"""The one stop request (CONTRACT 8): an Event that remembers when it was first set.

The shutdown deadline runs from the request, not from the moment the main loop noticed it
(a blocking read may take BLOCK_MS to return): ``deadline()`` gives that instant.
"""

from __future__ import annotations

import threading
import time


class StopEvent(threading.Event):
    """A ``threading.Event`` whose first ``set()`` is timed (monotonic clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.requested_at: float | None = None

    def set(self) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        super().set()


def deadline(stop: threading.Event, timeout_s: float) -> float:
    """``timeout_s`` after the stop request (or after now, for a plain Event or no request yet)."""
    requested = getattr(stop, "requested_at", None)
    return (requested if requested is not None else time.monotonic()) + timeout_s
