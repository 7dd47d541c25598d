"""WebSocket frames built once and written to many connections (RFC 6455; server to client: unmasked).

websockets serialises a frame per connection and send. A flush sends the same update to every member
of a group, so the gateway serialises the update's frames once and writes the same bytes to each
member's transport (:func:`write`). A message longer than FRAGMENT_BYTES is split into fragments
(RFC 6455 5.4): a client that cannot take a whole update then holds at most one fragment in its
write buffer, and websockets' own control frames (ping, pong, close) may come between fragments. Data
frames of one client are written by one writer at a time (:class:`~processor.gateway.clients.Client`),
so two messages never interleave.

Compression (permessage-deflate, RFC 7692) is negotiated with ``server_no_context_takeover``: each message
is compressed on its own, so its compressed bytes are the same for every connection that negotiated the
same window, and a message is compressed once, not once per client (:func:`deflated_message`). Messages
shorter than DEFLATE_MIN_BYTES go uncompressed (RFC 7692 allows it per message): compressing a few hundred
bytes costs more than it saves.

Only three things of a websockets connection are used beyond its public API: ``protocol.state`` and
``transport`` (as ``websockets.broadcast`` does), and ``drain()`` (what its own ``send`` awaits); and the
negotiated extension's parameters (:func:`deflate_bits`).
"""

from __future__ import annotations

import zlib
from typing import Any

from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.protocol import State

FRAGMENT_BYTES = 64 * 1024
DEFLATE_MIN_BYTES = 4096
DEFLATE_LEVEL = 6  # zlib's default: about 15% smaller than level 1 for 4x its time, paid once per message
_TEXT, _CONTINUATION = 0x1, 0x0
_FIN, _RSV1 = 0x80, 0x40
_SYNC_TAIL = b"\x00\x00\xff\xff"


def deflate_extension() -> ServerPerMessageDeflateFactory:
    """What the server offers: no context takeover either way, so that neither side keeps a compressor or a
    decompressor per connection, and one compression of a message serves every client."""
    return ServerPerMessageDeflateFactory(server_no_context_takeover=True, client_no_context_takeover=True)


def deflate_bits(conn: Any) -> int | None:
    """The window bits to compress with for ``conn``, or None when it gets uncompressed messages."""
    for ext in getattr(getattr(conn, "protocol", None), "extensions", ()):
        if isinstance(ext, PerMessageDeflate) and ext.local_no_context_takeover:
            return ext.local_max_window_bits
    return None


def _header(first: int, n: int) -> bytes:
    if n < 126:
        return bytes((first, n))
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big")
    return bytes((first, 127)) + n.to_bytes(8, "big")


def text_message(payload: bytes, fragment_bytes: int = FRAGMENT_BYTES, *, rsv1: bool = False) -> tuple[bytes, ...]:
    """The frames of one text message: one frame, or fragments of at most ``fragment_bytes`` of payload.
    ``rsv1`` marks it compressed (on the first frame only, RFC 7692 6.1)."""
    n = len(payload)
    first = _RSV1 if rsv1 else 0
    if n <= fragment_bytes:
        return (_header(_FIN | first | _TEXT, n) + payload,)
    view = memoryview(payload)
    frames = []
    for start in range(0, n, fragment_bytes):
        chunk = view[start:start + fragment_bytes]
        fin = _FIN if start + fragment_bytes >= n else 0
        frames.append(_header(fin | (first | _TEXT if start == 0 else _CONTINUATION), len(chunk)) + chunk)
    return tuple(frames)


def deflated_message(payload: bytes, bits: int) -> tuple[bytes, ...]:
    """The frames of one text message compressed on its own (RFC 7692 7.2.1: the sync flush's tail removed)."""
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return text_message(data[:-4] if data.endswith(_SYNC_TAIL) else data, rsv1=True)


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
