"""Synthetic positions from a fleet of moving trackers (CONTRACT 6 ``simulate``).

Each device drives a plausible track: it starts near a city, its heading drifts,
its speed wanders between 0 and 120 km/h with stops, and its position advances by
speed x heading x the time since its last report. Payloads look like what
``tcp-ingestion`` sends: integer epoch-ms or ISO-8601 ``Z`` timestamps, and about
ten IO elements with every sentinel of CONTRACT 1.1 (``__bigint`` above and below
2**53, ``__buffer``, and now and then Node's ``{"type": "Buffer"}`` form).

Timestamps of a device strictly increase, by about a second a report, and are
never ahead of the clock. With a seed (and a fixed ``start_ms``) the output is the same
on every run.
"""

from __future__ import annotations

import base64
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import redis

from .core.errors import TransientError
from .core.redact import redact

# (latitude, longitude, altitude in metres): where the tracks start.
CITIES: tuple[tuple[float, float, float], ...] = (
    (54.6872, 25.2797, 112.0),   # Vilnius
    (52.2297, 21.0122, 100.0),   # Warsaw
    (52.5200, 13.4050, 34.0),    # Berlin
    (40.4168, -3.7038, 667.0),   # Madrid
    (51.5072, -0.1276, 11.0),    # London
    (40.7128, -74.0060, 10.0),   # New York
    (-23.5505, -46.6333, 760.0), # Sao Paulo
    (-33.8688, 151.2093, 58.0),  # Sydney
    (35.6762, 139.6503, 40.0),   # Tokyo
    (-33.9249, 18.4241, 25.0),   # Cape Town
    (19.4326, -99.1332, 2240.0), # Mexico City
    (19.0760, 72.8777, 14.0),    # Mumbai
)
MAX_SPEED_KMH = 120.0
METRES_PER_DEGREE = 111_320.0
REPORT_INTERVAL_MS = 1000
REPORT_JITTER_MS = 200          # each report comes 800..1200 ms after the previous one
ISO_SHARE = 0.3                 # share of timestamps sent as ISO-8601 strings, the rest epoch ms
NODE_BUFFER_SHARE = 0.05        # share of buffers in Node's {"type": "Buffer", "data": [...]} form
NO_FIX_SHARE = 0.02             # satellites 0: no GPS fix, the position is still stored
PROGRESS_EVERY_S = 1.0
# Published flat out with no count, each device starts this many reports (about a day) back.
FLAT_OUT_REPORTS = 86_400


def _luhn_digit(digits: str) -> str:
    """The check digit that makes ``digits`` + it pass the Luhn test (as IMEIs do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return str((10 - total % 10) % 10)


def imei(base: int, index: int) -> str:
    """A 15-digit IMEI-like id: "35", 12 digits from ``base + index``, a Luhn check digit."""
    body = f"35{(base + index) % 10**12:012d}"
    return body + _luhn_digit(body)


def iso_ms(ts_ms: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    t = time.gmtime(ts_ms // 1000)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ts_ms % 1000:03d}Z")


class _Device:
    """One tracker's state between two reports."""

    __slots__ = ("alt", "buffers", "device_id", "gsm", "heading", "iccid", "ignition", "lat", "lon",
                 "node_buffers", "odometer_m", "parked", "speed", "target", "ts")

    def __init__(self, device_id: str, rng: random.Random, start_ms: int) -> None:
        city_lat, city_lon, city_alt = CITIES[int(rng.random() * len(CITIES))]
        self.device_id = device_id
        self.ts = start_ms - REPORT_INTERVAL_MS  # the first report comes about start_ms
        self.lat = city_lat + (rng.random() - 0.5) * 0.4
        self.lon = city_lon + (rng.random() - 0.5) * 0.4
        self.alt = city_alt + rng.random() * 50
        self.heading = rng.random() * 360
        self.speed = rng.random() * 60
        self.target = rng.random() * MAX_SPEED_KMH
        self.parked = 0  # reports left standing still
        self.odometer_m = int(rng.random() * 400_000_000)
        # ICCIDs are 19 digits: above 2**53, so they stay decimal strings once stored.
        self.iccid = "89" + "".join(str(int(rng.random() * 10)) for _ in range(17))
        raw = [bytes(int(rng.random() * 256) for _ in range(4 + int(rng.random() * 7))) for _ in range(4)]
        self.buffers = [{"__buffer": base64.b64encode(b).decode("ascii")} for b in raw]
        self.node_buffers = [{"type": "Buffer", "data": list(b)} for b in raw]
        self.ignition = 1
        self.gsm = 1 + int(rng.random() * 5)


class Fleet:
    """``devices`` trackers reporting round-robin.

    ``start_ms`` is the time of each device's first report; by default it is chosen at
    the first call so that the reports of that call end about now. Timestamps are never
    ahead of the clock: a device that would report in the future reports now (at least
    1 ms after its previous report) instead. With ``live=True`` every report carries the
    time it was made (for publishing at a real-time rate).
    """

    def __init__(self, devices: int, *, seed: int | None = None, start_ms: int | None = None,
                 live: bool = False) -> None:
        if devices < 1:
            raise ValueError("devices must be at least 1")
        self.devices = devices
        self.live = live
        self._rng = random.Random(seed)
        self._start_ms = start_ms
        self._fleet: list[_Device] = []
        self._next = 0  # the device whose turn it is

    def _ensure_fleet(self, count: int) -> None:
        if self._fleet:
            return
        if self._start_ms is None:
            now_ms = int(time.time() * 1000)
            per_device = -(-count // self.devices)
            self._start_ms = now_ms if self.live else \
                now_ms - per_device * (REPORT_INTERVAL_MS + REPORT_JITTER_MS)
        base = int(self._rng.random() * 10**12)
        self._fleet = [_Device(imei(base, i), self._rng, self._start_ms) for i in range(self.devices)]

    def positions(self, count: int) -> Iterator[dict[str, Any]]:
        """The next ``count`` positions, round-robin over the devices, as dicts before JSON."""
        self._ensure_fleet(count)
        fleet, n = self._fleet, self.devices
        for _ in range(count):
            device = fleet[self._next]
            self._next = (self._next + 1) % n
            yield self._report(device)

    def payloads(self, count: int) -> Iterator[bytes]:
        """The next ``count`` positions as JSON payloads (bytes), as ``tcp-ingestion`` XADDs them."""
        dumps = orjson.dumps
        for position in self.positions(count):
            yield dumps(position)

    def _advance_clock(self, device: _Device) -> float:
        """Move the device's timestamp on; returns the seconds elapsed since its last report."""
        now_ms = int(time.time() * 1000)
        previous = device.ts
        if self.live:
            ts = now_ms
        else:
            jitter = int(self._rng.random() * 2 * REPORT_JITTER_MS) - REPORT_JITTER_MS
            ts = min(previous + REPORT_INTERVAL_MS + jitter, now_ms)
        device.ts = max(ts, previous + 1)
        return (device.ts - previous) / 1000.0

    def _drive(self, device: _Device, dt: float) -> None:
        """Speed, heading and position after ``dt`` seconds."""
        rng = self._rng.random
        if device.parked:
            device.parked -= 1
            device.speed = 0.0
        elif rng() < 0.01:
            device.parked = 5 + int(rng() * 60)  # a traffic light, a delivery, a night
        else:
            if rng() < 0.05:
                device.target = rng() * MAX_SPEED_KMH
            device.speed += (device.target - device.speed) * 0.2 + (rng() - 0.5) * 4
            device.speed = min(max(device.speed, 0.0), MAX_SPEED_KMH)
            device.heading = (device.heading + (rng() - 0.5) * 30) % 360
        distance = device.speed / 3.6 * dt
        device.odometer_m += int(distance)
        rad = math.radians(device.heading)
        device.lat += distance * math.cos(rad) / METRES_PER_DEGREE
        metres_per_degree_lon = METRES_PER_DEGREE * max(math.cos(math.radians(device.lat)), 0.01)
        device.lon += distance * math.sin(rad) / metres_per_degree_lon
        if abs(device.lat) > 85:  # turn back before the pole
            device.lat = math.copysign(85, device.lat)
            device.heading = (180 - device.heading) % 360
        if device.lon > 180:
            device.lon -= 360
        elif device.lon < -180:
            device.lon += 360
        device.alt = min(max(device.alt + (rng() - 0.5) * 2, -50.0), 4000.0)

    def _report(self, device: _Device) -> dict[str, Any]:
        dt = self._advance_clock(device)
        self._drive(device, dt)
        rng = self._rng.random
        ignition = 0 if device.parked > 30 else 1
        priority, event_id = 0, 0
        if ignition != device.ignition:
            priority, event_id = 1, 239  # the ignition IO triggers a high-priority record
        elif rng() < 0.003:
            priority, event_id = 2, 247  # crash detection: panic
        elif rng() < 0.02:
            priority, event_id = 1, 240  # movement
        device.ignition = ignition
        if rng() < 0.05:
            device.gsm = 1 + int(rng() * 5)
        buffer = (device.node_buffers if rng() < NODE_BUFFER_SHARE else device.buffers)[int(rng() * 4)]
        return {
            "device_id": device.device_id,
            "timestamp": iso_ms(device.ts) if rng() < ISO_SHARE else device.ts,
            "latitude": round(device.lat, 7),
            "longitude": round(device.lon, 7),
            "altitude": round(device.alt),
            "angle": int(device.heading) % 360,
            "speed": round(device.speed),
            "satellites": 0 if rng() < NO_FIX_SHARE else 5 + int(rng() * 16),
            "priority": priority,
            "event_id": event_id,
            "attributes": {
                "239": ignition,                                    # ignition
                "240": 1 if device.speed > 0 else 0,                # movement
                "21": device.gsm,                                   # GSM signal
                "66": 12_000 + int(rng() * 2_400),                  # external voltage, mV
                "67": 3_900 + int(rng() * 200),                     # battery voltage, mV
                "181": 5 + int(rng() * 20),                         # PDOP x 10
                "182": 5 + int(rng() * 15),                         # HDOP x 10
                "16": {"__bigint": str(device.odometer_m)},         # total odometer, 8 bytes
                "11": {"__bigint": device.iccid},                   # ICCID, above 2**53
                "385": buffer,                                      # beacon data (codec 8E, variable)
            },
        }


def publish(client: redis.Redis, stream: str, payloads: Iterable[bytes], *, pipeline_size: int = 500) -> int:
    """XADD each payload as the entry's ``payload`` field, ``pipeline_size`` at a time; returns the count.

    Raises :class:`TransientError` when Redis cannot be reached.
    """
    pipe = client.pipeline(transaction=False)
    sent = queued = 0
    try:
        for payload in payloads:
            pipe.xadd(stream, {"payload": payload})
            queued += 1
            if queued == pipeline_size:
                pipe.execute()
                sent, queued = sent + queued, 0
        if queued:
            pipe.execute()
            sent += queued
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"publishing to Redis failed: {redact(exc)}") from exc
    finally:
        pipe.reset()
    return sent


class _Progress:
    """Calls ``progress`` about once a second with the count and the recent rate."""

    def __init__(self, progress: Callable[[str], None], stream: str) -> None:
        self._progress = progress
        self._stream = stream
        self._last_t = self._start = time.monotonic()
        self._last_n = 0

    def tick(self, published: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_t < PROGRESS_EVERY_S:
            return
        since, done = (self._start, 0) if final else (self._last_t, self._last_n)
        rate = (published - done) / max(now - since, 1e-9)
        self._progress(f"simulate: published {published} positions ({rate:.0f}/s) to {self._stream}")
        self._last_t, self._last_n = now, published


def run_simulation(client: redis.Redis, stream: str, *, devices: int, rate: float | None,
                   duration: float | None, count: int | None, stop: threading.Event,
                   progress: Callable[[str], None], seed: int | None = None,
                   pipeline_size: int = 500) -> int:
    """Publish positions at ``rate`` a second (as fast as possible when None) until ``count``
    positions or ``duration`` seconds, whichever comes first, or until ``stop`` is set.

    Calls ``progress`` about once a second, and once at the end with the overall rate.
    Returns how many positions were published.
    """
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number of positions a second, got {rate!r}")
    # At a real-time rate each report carries the time it was made; flat out, the reports
    # step by a second from a start far enough back that the last one is about now.
    start_ms = None
    if rate is None:
        reports = -(-count // devices) if count is not None else FLAT_OUT_REPORTS
        start_ms = int(time.time() * 1000) - reports * (REPORT_INTERVAL_MS + REPORT_JITTER_MS)
    fleet = Fleet(devices, seed=seed, start_ms=start_ms, live=rate is not None)
    # A chunk is what one XADD pipeline sends: about a tenth of a second's worth at a set rate.
    chunk = pipeline_size if rate is None else max(1, min(pipeline_size, int(rate / 10)))
    reporter = _Progress(progress, stream)
    published = 0
    start = time.monotonic()
    while not stop.is_set():
        elapsed = time.monotonic() - start
        if duration is not None and elapsed >= duration:
            break
        want = chunk if count is None else min(chunk, count - published)
        if want <= 0:
            break
        if rate is not None:
            due = int(elapsed * rate) + 1 - published  # the n-th position is due at n / rate
            if due <= 0:
                stop.wait(max(published / rate - elapsed, 0.001))
                continue
            want = min(want, due)
        published += publish(client, stream, fleet.payloads(want), pipeline_size=pipeline_size)
        reporter.tick(published)
    reporter.tick(published, final=True)
    return published
