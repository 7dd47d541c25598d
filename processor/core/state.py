"""In-memory device state: a bounded LRU of the devices seen, updated before each write.

Updated by the main loop only, in stream order; read from other threads (the
metrics refresher, domain handlers) through :meth:`DeviceState.get` and
:meth:`DeviceState.snapshot`, which take the same lock and return copies.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Protocol

from .types import Position


@dataclass(slots=True)
class DeviceInfo:
    """What the processor knows of one device since it started."""

    last_position: Position
    position_count_session: int
    first_seen: float  # wall clock, unix seconds
    last_seen: float


class StateView(Protocol):
    """Read-only access, as given to domain handlers."""

    def get(self, device_id: str) -> DeviceInfo | None: ...

    def __len__(self) -> int: ...


class DeviceState:
    """LRU of at most ``max_devices`` devices; the least recently seen is evicted first."""

    def __init__(self, *, max_devices: int) -> None:
        if max_devices <= 0:
            raise ValueError("max_devices must be positive")
        self.max_devices = max_devices
        self._devices: OrderedDict[str, DeviceInfo] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def update(self, positions: Iterable[Position], now: float) -> None:
        """Account for ``positions`` in stream order.

        A device's last position only moves forward in ``ts``: a late, older
        position counts but does not replace it (CONTRACT 4 rule 9).
        """
        devices = self._devices
        get, move_to_end = devices.get, devices.move_to_end
        # Hot (once per position): indexes instead of the NamedTuple's names (device_id is
        # field 0, ts field 1), bound methods in locals; 0.63 -> 0.46 us a position.
        with self._lock:
            for pos in positions:
                device_id = pos[0]
                info = get(device_id)
                if info is None:
                    devices[device_id] = DeviceInfo(pos, 1, now, now)
                    if len(devices) > self.max_devices:
                        devices.popitem(last=False)
                        self.evicted += 1
                    continue
                move_to_end(device_id)
                info.position_count_session += 1
                info.last_seen = now
                if pos[1] > info.last_position[1]:
                    info.last_position = pos

    def get(self, device_id: str) -> DeviceInfo | None:
        """A copy of the device's state, or None if it is not tracked."""
        with self._lock:
            info = self._devices.get(device_id)
            if info is None:
                return None
            return DeviceInfo(info.last_position, info.position_count_session, info.first_seen, info.last_seen)

    def snapshot(self) -> dict[str, DeviceInfo]:
        """Copies of every tracked device (O(n): for tools and tests, not the hot path)."""
        with self._lock:
            return {k: DeviceInfo(v.last_position, v.position_count_session, v.first_seen, v.last_seen)
                    for k, v in self._devices.items()}

    def __len__(self) -> int:
        return len(self._devices)
