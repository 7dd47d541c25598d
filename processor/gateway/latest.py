"""Each device's latest position, forward-only, bounded; and what changed since the last flush.

Written by the stream reader's thread (and once by the snapshot), read by the event loop: every access
takes one lock and is short (no I/O under it). A position is kept as a :class:`Fix`: its JSON
already encoded once (CONTRACT 9's position shape), so a flush only joins bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime
from typing import Callable, Iterable, NamedTuple

import orjson

from ..core.types import Position


class Fix(NamedTuple):
    """One device's position as the gateway sends it."""

    device_id: str
    ts: datetime
    latitude: float
    longitude: float
    json: bytes  # the CONTRACT 9 position object, encoded
    entry_ms: int  # the stream entry id's time (the snapshot's rows: their ts), for the latency histogram


def iso_ms(ts: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z`` (``ts`` is timezone-aware UTC)."""
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def to_fix(p: Position, entry_ms: int) -> Fix:
    """The :class:`Fix` of a decoded position; raises TypeError if its attributes cannot be encoded."""
    body = orjson.dumps({
        "device_id": p.device_id, "ts": iso_ms(p.ts), "latitude": p.latitude, "longitude": p.longitude,
        "altitude": p.altitude, "angle": p.angle, "speed": p.speed, "satellites": p.satellites,
        "attributes": p.attributes if p.attributes is not None else {},
    })
    return Fix(p.device_id, p.ts, p.latitude, p.longitude, body, entry_ms)


class Applied(NamedTuple):
    accepted: int  # moved a device forward
    stale: int  # older than (or as old as) the device's latest: counted, not kept (forward-only)
    coalesced: int  # replaced a change not yet flushed: that older change is never sent


class LatestPositions:
    """Latest :class:`Fix` per device (LRU of at most ``max_devices``) and the changes since :meth:`take_changed`."""

    def __init__(self, *, max_devices: int) -> None:
        if max_devices <= 0:
            raise ValueError("max_devices must be positive")
        self.max_devices = max_devices
        self._devices: OrderedDict[str, Fix] = OrderedDict()
        self._changed: dict[str, Fix] = {}
        self._lock = threading.Lock()
        self.evicted = 0

    def apply(self, fixes: Iterable[Fix], *, mark_changed: bool = True) -> Applied:
        """Account for ``fixes`` in stream order; only a newer ``ts`` replaces a device's position."""
        accepted = stale = coalesced = 0
        devices, changed = self._devices, self._changed
        with self._lock:
            for fix in fixes:
                device = fix.device_id
                old = devices.get(device)
                if old is not None:
                    devices.move_to_end(device)
                    if fix.ts <= old.ts:
                        stale += 1
                        continue
                devices[device] = fix
                accepted += 1
                if old is None and len(devices) > self.max_devices:
                    gone, _ = devices.popitem(last=False)
                    changed.pop(gone, None)
                    self.evicted += 1
                if mark_changed:
                    if device in changed:
                        coalesced += 1
                    changed[device] = fix
        return Applied(accepted, stale, coalesced)

    def take_changed(self) -> dict[str, Fix]:
        """The latest change of each device since the previous call (each device once), and reset."""
        with self._lock:
            changed, self._changed = self._changed, {}
        return changed

    def get(self, device_id: str) -> Fix | None:
        with self._lock:
            return self._devices.get(device_id)

    def select(self, wanted: Callable[[Fix], bool]) -> list[Fix]:
        """Every device's latest fix that ``wanted`` accepts (O(devices): for a subscription's init)."""
        with self._lock:
            fixes = list(self._devices.values())
        return [f for f in fixes if wanted(f)]

    def __len__(self) -> int:
        return len(self._devices)
