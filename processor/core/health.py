"""Liveness and readiness (CONTRACT 7), shared by the main loop, the writer and the HTTP server."""

from __future__ import annotations

import threading
import time

# /healthz fails when the main loop has not turned for max(3 x BLOCK_MS, this).
MIN_STALL_S = 10.0


class Health:
    """Thread-safe record of the main loop's last turn and of the last Redis/PostgreSQL outcome."""

    def __init__(self, *, block_ms: int) -> None:
        self.stall_after_s = max(3 * block_ms / 1000, MIN_STALL_S)
        self._lock = threading.Lock()
        self._last_turn = time.monotonic()
        self._redis: tuple[float, str | None] = (0.0, "no Redis read yet")
        self._postgres: tuple[float, str | None] = (0.0, "no PostgreSQL write or probe yet")
        self._problems: dict[str, str] = {}  # standing problems that a later success elsewhere does not clear

    # --- liveness ---

    def turned(self) -> None:
        """Called by the main loop on every turn."""
        self._last_turn = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._last_turn
        if idle > self.stall_after_s:
            return False, f"main loop has not turned for {idle:.1f}s (limit {self.stall_after_s:.0f}s)"
        return True, "ok"

    # --- readiness: the latest outcome of each side wins ---

    def redis_result(self, error: str | None) -> None:
        with self._lock:
            self._redis = (time.monotonic(), error)

    def postgres_result(self, error: str | None, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        with self._lock:
            if at >= self._postgres[0]:
                self._postgres = (at, error)

    def postgres_age(self) -> float:
        return time.monotonic() - self._postgres[0]

    def postgres_ok(self) -> bool:
        """True when the latest PostgreSQL outcome was a success."""
        return self._postgres[1] is None

    def problem(self, name: str, reason: str | None) -> None:
        """A standing problem (``reason``) or its end (None), e.g. dead letters Redis refuses to store:
        it keeps the service not ready even while reads and writes succeed."""
        with self._lock:
            if reason is None:
                self._problems.pop(name, None)
            else:
                self._problems[name] = reason

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            problems = [f"redis: {self._redis[1]}"] if self._redis[1] else []
            if self._postgres[1]:
                problems.append(f"postgres: {self._postgres[1]}")
            problems.extend(f"{name}: {reason}" for name, reason in self._problems.items())
        return (not problems), ("; ".join(problems) or "ok")
