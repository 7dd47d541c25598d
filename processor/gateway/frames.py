"""WebSocket frames built once and written to many connections (RFC 6455; server to client: unmasked).

websockets serialises a frame per connection and send. A flush sends the same update to every member
of a group, so the gateway serialises the update's frames once and writes the same bytes to each
member's transport (:func:`write`). A message longer than FRAGMENT_BYTES is split into fragments
(RFC 6455 5.4): a client that cannot take a whole update then holds at most one fragment in its
write buffer, and websockets' own control frames (ping, pong, close) may come between fragments. Data
frames of one client are written by one writer at a time (:class:`~processor.gateway.clients.Client`),
so two messages never interleave.

Only three things of a websockets connection are used beyond its public API: ``protocol.state`` and
``transport`` (as ``websockets.broadcast`` does), and ``drain()`` (what its own ``send`` awaits).
"""

from __future__ import annotations

from typing import Any

from websockets.protocol import State

FRAGMENT_BYTES = 64 * 1024
_TEXT, _CONTINUATION = 0x1, 0x0
_FIN = 0x80


def _header(opcode: int, fin: bool, n: int) -> bytes:
    first = (_FIN if fin else 0) | opcode
    if n < 126:
        return bytes((first, n))
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big")
    return bytes((first, 127)) + n.to_bytes(8, "big")


def text_message(payload: bytes, fragment_bytes: int = FRAGMENT_BYTES) -> tuple[bytes, ...]:
    """The frames of one text message: one frame, or fragments of at most ``fragment_bytes`` of payload."""
    n = len(payload)
    if n <= fragment_bytes:
        return (_header(_TEXT, True, n) + payload,)
    view = memoryview(payload)
    frames = []
    for start in range(0, n, fragment_bytes):
        chunk = view[start:start + fragment_bytes]
        frames.append(_header(_TEXT if start == 0 else _CONTINUATION, start + fragment_bytes >= n, len(chunk))
                      + chunk)
    return tuple(frames)


def is_open(conn: Any) -> bool:
    """True while data frames may be written (not once a close has begun)."""
    return conn is not None and conn.protocol.state is State.OPEN


def buffered(conn: Any) -> int:
    """Bytes written but not yet taken by the kernel (0: a write goes straight to the socket)."""
    return conn.transport.get_write_buffer_size()


def write(conn: Any, frame: bytes) -> None:
    conn.transport.write(frame)


async def drain(conn: Any) -> None:
    """Wait while the write buffer is over websockets' high-water mark (returns at once below it)."""
    await conn.drain()
