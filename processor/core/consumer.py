"""The Redis Stream side: consumer group, reads, acknowledgements, reclaim.

redis-py errors are translated here, where they enter: a lost or refused
connection becomes :class:`TransientError`, a vanished group or stream
(NOGROUP) :class:`StreamGoneError`.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import hiredis
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import ProcessorError, StreamGoneError, TransientError
from .redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rule 12: the socket timeout must outlast a blocking read, or an idle stream would look like a failure.
SOCKET_TIMEOUT_MARGIN_S = 5.0
CONNECT_TIMEOUT_S = 5.0


class Entry(NamedTuple):
    """One stream entry as read. ``fields`` is None when its data is gone (trimmed or deleted).

    A NamedTuple (immutable, no per-instance dict): one is built per entry read, and a
    frozen dataclass costs several times as much to build (docs/performance.md).
    """

    entry_id: str
    fields: Mapping[bytes, bytes] | None
    deliveries: int = 1


_new_entry = tuple.__new__  # Entry(...) without the Python-level __new__, for the hot read path


def redis_client(url: str, *, block_ms: int) -> redis.Redis:
    """A client whose socket timeout outlasts ``block_ms``, with one quick retry on a dropped connection."""
    return redis.Redis.from_url(
        url,
        socket_timeout=block_ms / 1000 + SOCKET_TIMEOUT_MARGIN_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        decode_responses=False,
        command_packer=CommandPacker(),
    )


class CommandPacker:
    """Packs a command as redis-py's own packer does, without its Python call per argument.

    redis-py encodes each argument in Python before hiredis packs them; ``hiredis.pack_command``
    encodes str (UTF-8), bytes and int itself, in C. For the XACK of a batch's 1,000 ids that is
    0.51 -> 0.08 ms, 0.43 us a position of the main thread (docs/performance.md, round 7). Any
    other argument is encoded first as redis-py's ``Encoder`` does: a float by its ``repr``,
    a memoryview or bytearray as bytes, and a bool or anything else refused with ``DataError``.
    A first argument holding spaces ("XGROUP CREATE") is split into words, as redis-py does.
    """

    def pack(self, *args: Any) -> list[bytes]:
        if not _PACKED_IN_C.issuperset(map(type, args)):
            args = tuple(map(_encode, args))
        first = args[0]
        if type(first) is str:
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


_PACKED_IN_C = frozenset((str, bytes, int))  # not bool: a subclass of int, which redis-py refuses


def _encode(value: Any) -> Any:
    """One argument as redis-py's Encoder makes it (for the kinds hiredis is not given as they are)."""
    if type(value) in _PACKED_IN_C:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, bool):
        raise redis.DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float first.")
    if isinstance(value, (bytes, str)):
        return value
    if isinstance(value, (int, float)):
        return repr(value).encode()
    raise redis.DataError(f"Invalid input of type: '{type(value).__name__}'. "
                          f"Convert to a bytes, string, int or float first.")


def translate(what: str, call: Callable[[], T]) -> T:
    """Run a Redis call, translating its errors into ours."""
    try:
        return call()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"{what}: {redact(exc) or type(exc).__name__}") from exc
    except redis.ResponseError as exc:
        # Also inside a pipeline, whose error reads "Command # 2 (XREADGROUP ...) of pipeline caused error: NOGROUP ..."
        if _NOGROUP.search(str(exc)):
            raise StreamGoneError(f"{what}: {redact(exc)}") from exc
        if _REFUSED.search(str(exc)):
            raise TransientError(f"{what}: Redis refuses it for now: {redact(exc)}") from exc
        raise ProcessorError(f"{what}: {redact(exc)}") from exc


# NOGROUP: the group or the stream is gone. "UNBLOCKED the stream key no longer exists": Redis 7
# ends a blocked XREADGROUP that way when the stream key is deleted under it. Both mean "recreate
# the group" (CONTRACT 4 rule 11). Any other UNBLOCKED (the instance turned replica) is a refusal.
_NOGROUP = re.compile(r"(?:^|caused error: )(?:NOGROUP\b|UNBLOCKED the stream key no longer exists)")
# Replies that say "not now" rather than "never": OOM at maxmemory, READONLY on a replica after a
# failover, MISCONF when snapshots fail, LOADING, BUSY, MASTERDOWN, NOREPLICAS, TRYAGAIN, CLUSTERDOWN.
# They are transient: back off, stay alive, keep the entries pending (redis-py gives the message
# without the code for some of them, hence the phrases).
_REFUSED = re.compile(r"(?:^|caused error: )(?:OOM|READONLY|MISCONF|LOADING|BUSY|MASTERDOWN|NOREPLICAS|TRYAGAIN|"
                      r"CLUSTERDOWN|UNBLOCKED)\b|command not allowed when used memory|"
                      r"You can't write against a read only|Redis is loading")
# XCLAIM takes this many ids per command when keeping our own entries fresh.
TOUCH_CHUNK = 1000


def _id_str(entry_id: Any) -> str:
    """An entry id (or name) as redis-py returns it, bytes or str, as str."""
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


class StreamConsumer:
    """Reads one stream through one consumer group, as one named consumer.

    On start (and after the group is recreated) it reads its own pending
    entries from id ``0`` until none are left, then new ones with ``>``
    (CONTRACT 4 rule 4).
    """

    def __init__(self, *, client: redis.Redis, stream: str, group: str, consumer: str,
                 batch_size: int = 1000, block_ms: int = 1000) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        # "0"-based cursor while draining our own pending entries; None once on ">".
        self._pending_cursor: str | None = "0"
        # New entries are read through a second client on the same connection pool that
        # leaves the XREADGROUP reply as Redis sent it: redis-py's own parsing builds a
        # dict per entry in Python, about a fifth of the read's cost (docs/performance.md).
        self._raw = redis.Redis(connection_pool=client.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _unparsed)

    # --- group ---

    def ensure_group(self) -> bool:
        """Create the group from id 0 with MKSTREAM; True if created, False if it existed (BUSYGROUP).

        Looks first (XINFO GROUPS, a read): Redis at maxmemory refuses XGROUP CREATE with OOM
        even when the group exists, and a restart must then go on reading, not wait for memory.
        """
        if self._group_exists():
            return False
        try:
            translate("XGROUP CREATE", lambda: self.client.xgroup_create(
                self.stream, self.group, id="0", mkstream=True))
        except ProcessorError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        log.info("consumer group %s created on stream %s", self.group, self.stream,
                 extra={"consumer": self.consumer})
        return True

    def _group_exists(self) -> bool:
        try:
            groups = translate("XINFO GROUPS", lambda: self.client.xinfo_groups(self.stream))
        except TransientError:
            raise
        except ProcessorError:  # no such key: the stream is not there yet
            return False
        return any(_id_str(g.get("name")) == self.group for g in groups)

    def recover_group(self) -> None:
        """After NOGROUP (e.g. Redis restarted without persistence): recreate and re-read from our pending list."""
        log.warning("consumer group %s or stream %s disappeared; recreating it from id 0",
                    self.group, self.stream, extra={"consumer": self.consumer})
        self.ensure_group()
        self._pending_cursor = "0"

    @property
    def draining_pending(self) -> bool:
        return self._pending_cursor is not None

    # --- reading ---

    def read(self, block_ms: int | None = None, ack: Sequence[str] = ()) -> list[Entry]:
        """The next batch: our own pending entries first, then new ones.

        Blocks up to ``block_ms`` (default: the configured BLOCK_MS, never longer) for new entries.
        ``ack``: ids to XACK first, in the same round trip as the read (one wait instead of two).
        """
        if self._pending_cursor is not None:
            if ack:
                self.ack(ack)
                ack = ()
            entries = self._read_pending()
            if entries:
                return entries
            log.info("own pending entries done; reading new entries", extra={"consumer": self.consumer})
            self._pending_cursor = None
        block = min(block_ms, self.block_ms) if block_ms is not None else self.block_ms
        if ack:
            reply = translate("XACK + XREADGROUP", lambda: self._ack_and_read(ack, block))
        else:
            reply = translate("XREADGROUP", lambda: self._raw.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=self.batch_size, block=block))
        return _new_entries(reply)

    def _ack_and_read(self, ids: Sequence[str], block: int) -> Any:
        pipe = self._raw.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch_size, block=block)
        return pipe.execute()[1]

    def _read_pending(self) -> list[Entry]:
        cursor = self._pending_cursor or "0"
        reply = translate("XREADGROUP (pending)", lambda: self.client.xreadgroup(
            self.group, self.consumer, {self.stream: cursor}, count=self.batch_size))
        raw = _entries(reply)
        if not raw:
            return []
        self._pending_cursor = _id_str(raw[-1][0])
        ids = [_id_str(eid) for eid, _ in raw]
        counts = self.delivery_counts(ids)
        return [Entry(i, fields or None, counts.get(i, 1)) for i, (_, fields) in zip(ids, raw)]

    def delivery_counts(self, ids: Sequence[str]) -> dict[str, int]:
        """The exact delivery count of each of ``ids`` (XPENDING of each id alone, one round trip).

        One range over all of them would be cheaper, but its COUNT bounds the rows it returns:
        other entries of ours inside the range push some of the wanted ones out, and they would
        be counted as delivered once (a dead letter's ``deliveries`` then lies).
        """
        if not ids:
            return {}

        def query() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            return pipe.execute()

        counts: dict[str, int] = {}
        for rows in translate("XPENDING", query):
            for row in rows:
                counts[_id_str(row["message_id"])] = int(row["times_delivered"])
        return counts

    def touch(self, ids: Sequence[str]) -> int:
        """Reset the idle time of our own pending ``ids`` without counting a delivery (XCLAIM to
        ourselves with JUSTID), so no reclaim, ours or a peer's, takes entries held in memory here
        (CONTRACT 4 rule 14). Ids no longer pending are ignored (no FORCE). Returns how many were."""
        touched = 0
        for start in range(0, len(ids), TOUCH_CHUNK):
            chunk: list[Any] = list(ids[start:start + TOUCH_CHUNK])
            touched += len(translate("XCLAIM JUSTID", partial(
                self.client.xclaim, self.stream, self.group, self.consumer, 0, chunk, justid=True)))
        return touched

    def reset_connections(self) -> None:
        """Drop every pooled connection, so the next call connects afresh (after a failover the
        host name may lead elsewhere; a READONLY replica's connection would stay one)."""
        self.client.connection_pool.disconnect()

    def claim(self, min_idle_ms: int, start: str = "0-0", count: int | None = None
              ) -> tuple[str, list[Entry], list[str]]:
        """One XAUTOCLAIM page: (next cursor, claimed entries with delivery counts, ids whose data is gone).

        Pages can be empty while the cursor is not ``0-0``; the caller follows it.
        """
        reply = translate("XAUTOCLAIM", lambda: self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=min_idle_ms, start_id=start,
            count=count or self.batch_size))
        cursor = _id_str(reply[0])
        raw = [(eid, f) for eid, f in reply[1] if eid is not None]
        deleted = [_id_str(i) for i in reply[2]] if len(reply) > 2 else []
        ids = [_id_str(eid) for eid, _ in raw]
        counts = self.delivery_counts(ids)
        entries = [Entry(i, fields or None, counts.get(i, 1)) for i, (_, fields) in zip(ids, raw)]
        return cursor, entries, deleted

    # --- acknowledging and inspecting ---

    def ack(self, ids: Sequence[str]) -> int:
        """XACK ``ids`` in one call; the number Redis acknowledged."""
        if not ids:
            return 0
        return int(translate("XACK", lambda: self.client.xack(self.stream, self.group, *ids)))

    def group_stats(self) -> tuple[int | None, int]:
        """(lag, pending) of our group from XINFO GROUPS; lag is None when Redis cannot tell."""
        groups = translate("XINFO GROUPS", lambda: self.client.xinfo_groups(self.stream))
        for g in groups:
            name = g.get("name")
            if _id_str(name) == self.group:
                lag = g.get("lag")
                return (int(lag) if lag is not None else None), int(g.get("pending", 0))
        raise StreamGoneError(f"group {self.group} not found on {self.stream}")

    def pending_idle(self, min_idle_ms: int, limit: int) -> int:
        """How many entries have been pending longer than ``min_idle_ms`` on any consumer (at most ``limit``)."""
        rows = translate("XPENDING", lambda: self.client.xpending_range(
            self.stream, self.group, min="-", max="+", count=limit, idle=min_idle_ms))
        return len(rows)

    def consumers(self) -> list[dict[str, Any]]:
        return list(translate("XINFO CONSUMERS", lambda: self.client.xinfo_consumers(self.stream, self.group)))

    def delete_consumer_if_idle(self, name: str) -> bool:
        """Remove consumer ``name`` from the group if it holds no pending entry (keeps the group tidy)."""
        for c in self.consumers():
            if _id_str(c["name"]) == name:
                if int(c.get("pending", 0)) == 0:
                    translate("XGROUP DELCONSUMER", lambda: self.client.xgroup_delconsumer(
                        self.stream, self.group, name))
                    return True
                return False
        return False


def _entries(reply: Any) -> list[tuple[bytes, Mapping[bytes, bytes] | None]]:
    """The entries of a one-stream XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        streams: Iterable[Any] = reply.values()
        return [e for v in streams for e in (v[0] if v and isinstance(v[0], list) else v)]
    return list(reply[0][1])


def _unparsed(response: Any, **options: Any) -> Any:
    """A response callback that keeps the reply as the parser gave it."""
    return response


def _new_entries(reply: Any) -> list[Entry]:
    """Entries of an unparsed one-stream XREADGROUP reply: RESP3 ``{stream: [[id, [k, v, ...]], ...]}``
    or RESP2 ``[[stream, [...]]]``; None when the read timed out. Hot: one pass, no per-entry call."""
    if not reply:
        return []
    raw = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    new = _new_entry
    entries: list[Entry] = []
    append = entries.append
    for entry_id, flat in raw:
        if flat is not None and len(flat) == 2:
            fields: dict[bytes, bytes] | None = {flat[0]: flat[1]}  # the usual entry: payload only
        else:
            fields = None if flat is None else dict(zip(flat[::2], flat[1::2]))
        append(new(Entry, (entry_id.decode() if type(entry_id) is bytes else entry_id, fields, 1)))
    return entries
