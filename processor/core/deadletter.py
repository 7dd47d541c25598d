"""The dead-letter stream (CONTRACT 5): where entries that can never be stored go, with the reason.

Adding a dead letter and acknowledging its entry happen in one server-side script: the XADDs
first, then the XACK, atomically. Done as two calls, a crash or a Redis restart between them
left the entry pending with its letter already written, and its next delivery wrote a second
letter (the soak found it). An XADD that fails inside the script stops it before the XACK: the
entry stays pending, never acknowledged without its letter. Redrive moves letters back the same
way (XADD to the source stream, then XDEL, in one script).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import redis

from .consumer import translate
from .redact import redact

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 500
_FIELDS = 8  # field/value pairs of one dead letter (CONTRACT 5)

# KEYS: dead-letter stream, source stream. ARGV: group, n, then n x 16 field/value arguments, then
# the n source ids to acknowledge.
_ADD_AND_ACK = """
local n = tonumber(ARGV[2])
for k = 0, n - 1 do
    local first = 3 + k * 16
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, first, first + 15))
end
redis.call('XACK', KEYS[2], ARGV[1], unpack(ARGV, 3 + n * 16, #ARGV))
return n
"""
# KEYS: source stream, dead-letter stream. ARGV: n, then n payloads, then the n dead-letter ids.
_MOVE_BACK = """
local n = tonumber(ARGV[1])
for k = 2, n + 1 do
    redis.call('XADD', KEYS[1], '*', 'payload', ARGV[k])
end
return redis.call('XDEL', KEYS[2], unpack(ARGV, n + 2, #ARGV))
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry to dead-letter."""

    source_id: str
    payload: bytes
    reason: str
    detail: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One entry of the dead-letter stream, as listed."""

    dead_id: str
    fields: dict[str, str]
    payload: bytes


def _iso_utc(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class DeadLetters:
    """Writes to, lists and redrives the dead-letter stream of one source stream and group."""

    def __init__(self, *, client: redis.Redis, stream: str, source_stream: str, group: str) -> None:
        self.client = client
        self.stream = stream
        self.source_stream = source_stream
        self.group = group
        self._add_and_ack = client.register_script(_ADD_AND_ACK)
        self._move_back = client.register_script(_MOVE_BACK)

    def add(self, letters: Sequence[DeadLetter]) -> None:
        """XADD every letter and XACK their entries, atomically (one round trip). Raises TransientError
        if Redis is unreachable or refuses writes (then nothing was added and nothing acknowledged)."""
        if not letters:
            return
        now = _iso_utc(time.time())
        args: list[Any] = [self.group, len(letters)]
        for letter in letters:
            args += ["payload", letter.payload, "reason", letter.reason,
                     "detail", redact(letter.detail)[:MAX_DETAIL_CHARS], "source_stream", self.source_stream,
                     "source_id", letter.source_id, "group", self.group, "deliveries", str(letter.deliveries),
                     "dead_lettered_at", now]
        args += [letter.source_id for letter in letters]
        translate("XADD dead letter", lambda: self._add_and_ack(keys=[self.stream, self.source_stream], args=args))
        for letter in letters:
            log.warning("dead-lettered %s: %s (%s)", letter.source_id, letter.reason,
                        redact(letter.detail)[:200])

    def list(self, limit: int = 100, start: str = "-", end: str = "+") -> list[StoredDeadLetter]:
        """The oldest ``limit`` dead letters from ``start`` up to ``end``."""
        rows: Any = translate("XRANGE", lambda: self.client.xrange(self.stream, min=start, max=end, count=limit))
        out = []
        for dead_id, fields in rows:
            text = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items() if k != b"payload"}
            out.append(StoredDeadLetter(dead_id.decode(), text, fields.get(b"payload", b"")))
        return out

    def count(self) -> int:
        return int(translate("XLEN", lambda: self.client.xlen(self.stream)))

    def redrive(self, *, reason: str | None = None, limit: int | None = None, page: int = 500,
                progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Move dead letters back onto the source stream, then remove them from the dead-letter stream.

        Only those with ``reason`` if given, at most ``limit``. The XADD to the
        source stream and the XDEL happen in one script: nothing is moved twice or
        lost, whenever the process dies. Returns (moved, scanned).

        Only the letters present when the run starts are looked at: a running service
        dead-letters a redriven entry that is still bad again, at the stream's tail, and
        this run must not move it a second time.
        """
        moved = scanned = 0
        start = "-"
        end = self._last_id()
        while end is not None and (limit is None or moved < limit):
            batch = self.list(page, start, end)
            if not batch:
                break
            start = "(" + batch[-1].dead_id
            scanned += len(batch)
            chosen = [d for d in batch if reason is None or d.fields.get("reason") == reason]
            if limit is not None:
                chosen = chosen[: limit - moved]
            if chosen:
                self._move(chosen)
                moved += len(chosen)
            if progress is not None:
                progress(moved, scanned)
        return moved, scanned

    def _last_id(self) -> str | None:
        """The id of the newest dead letter now, None when there is none."""
        rows: Any = translate("XREVRANGE", lambda: self.client.xrevrange(self.stream, count=1))
        return rows[0][0].decode() if rows else None

    def _move(self, letters: Sequence[StoredDeadLetter]) -> None:
        args: list[Any] = [len(letters), *[d.payload for d in letters], *[d.dead_id for d in letters]]
        translate("redrive (XADD, XDEL)", lambda: self._move_back(keys=[self.source_stream, self.stream], args=args))
