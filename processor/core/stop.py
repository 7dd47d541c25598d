"""The one stop request (CONTRACT 8): an Event that remembers when it was first set, and the
signals that set it.

The shutdown deadline runs from the request, not from the moment the main loop noticed it
(a blocking read may take BLOCK_MS to return): ``deadline()`` gives that instant.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


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


# After the stop request, how long past SHUTDOWN_TIMEOUT_S the process may take before the
# signal thread ends it: the stop sequence's own steps are bounded by the deadline; this is the
# backstop for a call that no timeout reaches.
DEADLINE_GRACE_S = 1.5
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def install_signal_handlers(stop: threading.Event, *, timeout_s: float) -> None:
    """SIGTERM/SIGINT set ``stop``; a second one exits at once (status 1); and if the process is
    still alive ``timeout_s`` + DEADLINE_GRACE_S after the first, it exits 1 then.

    The signals are taken by a thread of their own (``sigwait``), not by a Python handler: a
    Python handler only runs in the main thread between bytecodes, so a main thread inside
    libpq (connecting to a server that does not answer, waiting for a lock) would see the
    first signal late and a second one merged into it. Called before any other thread
    starts, so that every thread inherits the blocked mask and only this one takes them
    (a child process would inherit it too: the service starts none).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def watch() -> None:
        signal.sigwait(STOP_SIGNALS)
        stop.set()  # the main loop does the rest: stop reading, drain, acknowledge, close
        if signal.sigtimedwait(STOP_SIGNALS, timeout_s + DEADLINE_GRACE_S) is None:
            log.error("stop did not finish within SHUTDOWN_TIMEOUT_S=%s; exiting now (entries not "
                      "settled stay pending)", timeout_s)
        os._exit(1)

    threading.Thread(target=watch, name="signals", daemon=True).start()
