"""Subscriptions grouped by what they receive, so that each message is encoded once per group, not per client.

A group is a distinct (uid, filter): clients of the same page send the same uid for the same
subscription, so thousands of spectators share one group and one encoded frame per flush. The
filter already holds the client's visibility scope (processor.domain.visibility), so users who may
see different devices never share a group. A group also shares what its members get outside the
flush: inits, and the catch-ups of members that fell behind (:meth:`Group.catch_up`), encoded once
per generation for every member that asks for the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

from .frames import DEFLATE_MIN_BYTES, deflated_message, text_message
from .latest import Fix
from .protocol import subscription_frame

# What a group keeps of the inits and catch-ups it encoded for its current generation (bigger ones are
# encoded for the one member that asked). 10,000 devices' positions are about 2 MB.
SHARED_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Filter:
    """Which devices a subscription receives: ``devices`` (None: any) and inside ``bbox`` (None: anywhere)."""

    devices: frozenset[str] | None = None
    bbox: tuple[float, float, float, float] | None = None

    @classmethod
    def build(cls, devices: frozenset[str] | None, bbox: tuple[float, float, float, float] | None,
              scope: frozenset[str] | None) -> Filter:
        """The client's request narrowed to its scope (None: every device)."""
        if scope is not None:
            devices = scope if devices is None else devices & scope
        return cls(devices, bbox)

    def accepts(self, fix: Fix) -> bool:
        if self.devices is not None and fix.device_id not in self.devices:
            return False
        return self.bbox is None or in_bbox(self.bbox, fix.longitude, fix.latitude)


def in_bbox(bbox: tuple[float, float, float, float], lon: float, lat: float) -> bool:
    min_lon, min_lat, max_lon, max_lat = bbox
    if not min_lat <= lat <= max_lat:
        return False
    if min_lon <= max_lon:
        return min_lon <= lon <= max_lon
    return lon >= min_lon or lon <= max_lon  # crosses the antimeridian


class Update:
    """One message of a group (a flush's update, a catch-up or an init), encoded once and shared by the members
    it is for. :meth:`frames` gives its WebSocket frames as written (:mod:`processor.gateway.frames`):
    uncompressed, or compressed with a given window, each built the first time a member needs it."""

    __slots__ = ("payload", "size", "oldest_entry_ms", "gen", "event", "_frames")

    def __init__(self, payload: bytes, size: int, oldest_entry_ms: int, gen: int, event: str = "update") -> None:
        self.payload = payload
        self.size = size  # positions in it
        self.oldest_entry_ms = oldest_entry_ms  # the oldest position's entry-id time (0: no positions)
        self.gen = gen  # the group's generation a member has after it
        self.event = event
        self._frames: dict[int | None, tuple[tuple[bytes, ...], int]] = {}

    def frames(self, deflate_bits: int | None = None) -> tuple[tuple[bytes, ...], int]:
        """(frames, their bytes): uncompressed for None, else compressed with that window (RFC 7692) unless the
        message is too short to be worth it."""
        found = self._frames.get(deflate_bits)
        if found is None:
            if deflate_bits is None or len(self.payload) < DEFLATE_MIN_BYTES:
                found = self._frames.get(None)
                if found is None:
                    message = text_message(self.payload)
                    found = self._frames[None] = (message, sum(map(len, message)))
            else:
                message = deflated_message(self.payload, deflate_bits)
                found = (message, sum(map(len, message)))
            self._frames[deflate_bits] = found
        return found


def encode(uid: str, event: str, fixes: list[Fix], gen: int) -> Update:
    return Update(subscription_frame(uid, event, [f.json for f in fixes]), len(fixes),
                  min((f.entry_ms for f in fixes), default=0), gen, event)


@dataclass(eq=False)
class Group:
    """One distinct subscription. ``changes`` keeps each device's latest fix and the generation (flush) it
    came in, for the last ``keep_gens`` generations: a member that fell behind is sent what changed since the
    generation it last got, built from here, so the member itself holds no positions at all."""

    uid: str
    filter: Filter
    keep_gens: int = 1000
    members: set[Any] = field(default_factory=set)
    gen: int = 0
    changes: dict[str, tuple[int, Fix]] = field(default_factory=dict)
    pruned_below: int = 0  # changes of generations below this were forgotten
    shared: dict[Hashable, Update] = field(default_factory=dict)  # inits and catch-ups of generation `gen`
    shared_bytes: int = 0
    catch_ups_encoded: int = 0  # (each shared by the members asking for it; gateway_updates_encoded_total)

    def update(self, fixes: list[Fix]) -> Update:
        self.gen += 1
        gen, changes = self.gen, self.changes
        for f in fixes:
            changes.pop(f.device_id, None)  # re-inserted last: the dict stays in generation order
            changes[f.device_id] = (gen, f)
        self._prune()
        self.shared.clear()
        self.shared_bytes = 0
        return encode(self.uid, "update", fixes, gen)

    def init(self, everything: Callable[[], list[Fix]]) -> Update:
        """An init: every matching device's latest position (``everything()``), shared until the next update.

        One encoded at generation g and sent later in g is still right: what changed since it was built
        comes with update g+1, which every member gets."""
        return self._shared("init", "init", everything)

    def catch_up(self, since: int, everything: Callable[[], list[Fix]]) -> Update:
        """For a member that last got generation ``since``: each device's latest fix changed after it, shared
        by every member asking the same at this generation; every matching device's latest position when
        ``since`` is older than what the group remembers."""
        if since < self.pruned_below:
            return self._shared("all", "update", everything)
        return self._shared(since, "update", lambda: self.since(since) or [])

    def _shared(self, key: Hashable, event: str, fixes: Callable[[], list[Fix]]) -> Update:
        message = self.shared.get(key)
        if message is None:
            message = encode(self.uid, event, fixes(), self.gen)
            if event == "update":
                self.catch_ups_encoded += 1
            if self.shared_bytes + len(message.payload) <= SHARED_BYTES:
                self.shared[key] = message
                self.shared_bytes += len(message.payload)
        return message

    def since(self, gen: int) -> list[Fix] | None:
        """Each device's latest fix changed after generation ``gen``; None if that is older than what is kept."""
        if gen < self.pruned_below:
            return None
        out = []
        for g, f in reversed(self.changes.values()):  # newest first: stop at the first one not after `gen`
            if g <= gen:
                break
            out.append(f)
        out.reverse()
        return out

    def _prune(self) -> None:
        horizon = self.gen - self.keep_gens
        if horizon <= self.pruned_below:
            return
        changes = self.changes
        while changes:
            device = next(iter(changes))
            if changes[device][0] > horizon:
                break
            del changes[device]
        self.pruned_below = horizon


class Registry:
    """Every group, and an index from device id to the groups that name it (the others see every change)."""

    def __init__(self, *, keep_gens: int = 1000) -> None:
        self.keep_gens = keep_gens  # generations a group remembers (the slow-client limit in flushes, and some)
        self.groups: dict[tuple[str, Filter], Group] = {}
        self._by_device: dict[str, set[Group]] = {}
        self._unindexed: set[Group] = set()  # no device list: they look at every change

    def join(self, member: Any, uid: str, flt: Filter) -> Group:
        group = self.groups.get((uid, flt))
        if group is None:
            group = self.groups[(uid, flt)] = Group(uid, flt, self.keep_gens)
            if flt.devices is None:
                self._unindexed.add(group)
            else:
                for device in flt.devices:
                    self._by_device.setdefault(device, set()).add(group)
        group.members.add(member)
        return group

    def leave(self, member: Any, group: Group) -> None:
        group.members.discard(member)
        if group.members or self.groups.get((group.uid, group.filter)) is not group:
            return
        del self.groups[(group.uid, group.filter)]
        if group.filter.devices is None:
            self._unindexed.discard(group)
            return
        for device in group.filter.devices:
            groups = self._by_device.get(device)
            if groups is not None:
                groups.discard(group)
                if not groups:
                    del self._by_device[device]

    def updates(self, changed: dict[str, Fix]) -> Iterable[tuple[Group, Update]]:
        """Each group's update for this flush's ``changed`` fixes; groups with nothing new are left out."""
        hits: dict[Group, list[Fix]] = {}
        if self._by_device:
            by_device = self._by_device
            small, large = (changed, by_device) if len(changed) <= len(by_device) else (by_device, changed)
            for device in small:
                if device in large:
                    fix = changed[device]
                    for group in by_device[device]:
                        hits.setdefault(group, []).append(fix)
        everything = list(changed.values())
        for group in self._unindexed:
            hits[group] = everything if group.filter.bbox is None else \
                [f for f in everything if in_bbox(group.filter.bbox, f.longitude, f.latitude)]
        for group, fixes in hits.items():
            if group.filter.devices is not None and group.filter.bbox is not None:
                fixes = [f for f in fixes if in_bbox(group.filter.bbox, f.longitude, f.latitude)]
            if fixes:
                yield group, group.update(fixes)
