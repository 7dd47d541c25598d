"""Subscriptions grouped by what they receive, so that each update is encoded once per group, not per client.

A group is a distinct (uid, filter): clients of the same page send the same uid for the same
subscription, so thousands of spectators share one group and one encoded frame per flush. The
filter already holds the client's visibility scope (processor.domain.visibility), so users who may
see different devices never share a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

from .latest import Fix
from .protocol import subscription_frame


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


class Update(NamedTuple):
    """One group's update of one flush (generation ``gen``), encoded once and shared by every member."""

    frame: bytes
    size: int  # positions in it
    oldest_entry_ms: int
    gen: int


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

    def update(self, fixes: list[Fix]) -> Update:
        self.gen += 1
        gen, changes = self.gen, self.changes
        for f in fixes:
            changes.pop(f.device_id, None)  # re-inserted last: the dict stays in generation order
            changes[f.device_id] = (gen, f)
        self._prune()
        frame = subscription_frame(self.uid, "update", [f.json for f in fixes])
        return Update(frame, len(fixes), min(f.entry_ms for f in fixes), gen)

    def since(self, gen: int) -> list[Fix] | None:
        """Each device's latest fix changed after generation ``gen``; None if that is older than what is kept."""
        if gen < self.pruned_below:
            return None
        out = [f for g, f in self.changes.values() if g > gen]
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
