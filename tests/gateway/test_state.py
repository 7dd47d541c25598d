"""The gateway's in-memory pieces on their own: forward-only latest positions, groups, a slow client's merge,
frames built once."""

from __future__ import annotations

import json
import zlib
from datetime import datetime, timedelta, timezone

from prometheus_client import CollectorRegistry

from processor.core.types import Position
from processor.gateway.clients import CatchUp, Client
from processor.gateway.frames import deflated_message, text_message
from processor.gateway.latest import LatestPositions, iso_ms, to_fix
from processor.gateway.metrics import GatewayMetrics
from processor.gateway.subscriptions import Filter, Registry

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def fix(device: str, seconds: float = 0, lat: float = 0.0, lon: float = 0.0):
    return to_fix(Position(device, T0 + timedelta(seconds=seconds), lat, lon), 1_000)


def test_iso_ms_truncates_to_milliseconds():
    assert iso_ms(T0) == "2026-01-02T03:04:05.678Z"


def test_latest_is_forward_only_bounded_and_coalesces():
    latest = LatestPositions(max_devices=2)
    applied = latest.apply([fix("a", 1), fix("a", 2), fix("a", 0), fix("b", 1), fix("b", 1)])
    assert applied == (3, 2, 1)  # accepted a@1, a@2, b@1; stale a@0, b@1 again; a@1 coalesced into a@2
    changed = latest.take_changed()
    assert {d: f.ts for d, f in changed.items()} == {"a": T0 + timedelta(seconds=2), "b": T0 + timedelta(seconds=1)}
    assert latest.take_changed() == {}
    latest.apply([fix("c", 1)])  # evicts the least recently seen: "a"
    assert (latest.get("a"), len(latest), latest.evicted) == (None, 2, 1)


def test_registry_groups_by_uid_and_filter_and_indexes_devices():
    reg = Registry()
    members = [object() for _ in range(4)]
    g_all = reg.join(members[0], "map", Filter())
    assert reg.join(members[1], "map", Filter()) is g_all
    g_dev = reg.join(members[2], "map", Filter.build(frozenset({"a", "b"}), None, frozenset({"b", "z"})))
    assert g_dev.filter.devices == frozenset({"b"})  # narrowed to the scope
    g_box = reg.join(members[3], "map", Filter(None, (170.0, -10.0, -170.0, 10.0)))  # across the antimeridian
    changed = {d.device_id: d for d in (fix("a"), fix("b"), fix("e", lon=175.0), fix("w", lon=-175.0))}
    updates = {id(g): u for g, u in reg.updates(changed)}
    assert {u.size for u in updates.values()} == {4, 1, 2}
    assert sorted(f.device_id for f in g_all.since(0)) == ["a", "b", "e", "w"]
    assert [f.device_id for f in g_dev.since(0)] == ["b"]
    assert sorted(f.device_id for f in g_box.since(0)) == ["e", "w"]
    for m, g in zip(members, (g_all, g_all, g_dev, g_box)):
        reg.leave(m, g)
    assert reg.groups == {} and list(reg.updates(changed)) == []


def test_a_slow_client_holds_one_marker_per_subscription_and_catches_up_from_its_group():
    metrics = GatewayMetrics(registry=CollectorRegistry())
    client = Client(conn=None, scope=None, metrics=metrics, initial=lambda flt: [])
    reg = Registry(keep_gens=5)
    group = reg.join(client, "map", Filter())
    client.subscriptions["map"] = group
    for step in range(3):
        (_, update), = reg.updates({d: fix(d, step) for d in ("a", "b")} if step < 2 else {"c": fix("c", 2)})
        client.offer("map", update)
    pending = client.pending["map"]
    assert list(client.pending) == ["map"] and isinstance(pending, CatchUp) and pending.since == 0
    assert {f.device_id: f.ts for f in group.since(pending.since)} == {
        "a": T0 + timedelta(seconds=1), "b": T0 + timedelta(seconds=1), "c": T0 + timedelta(seconds=2)}
    assert [f.device_id for f in group.since(2)] == ["c"]
    assert metrics.registry.get_sample_value("gateway_positions_coalesced_total", {"where": "slow_client"}) == 2
    assert client.backlog_since is not None
    for step in range(3, 10):  # the group forgets changes older than keep_gens flushes
        reg.updates({"a": fix("a", step)}).__next__()
    assert group.since(0) is None and [f.device_id for f in group.since(group.gen - 1)] == ["a"]
    assert sorted(group.changes) == ["a"]


def parse_frames(frames: tuple[bytes, ...]) -> tuple[list[tuple[int, bool]], bytes]:
    """(opcode, fin) of each frame and the message's payload (server frames: unmasked)."""
    kinds, payload = [], b""
    for frame in frames:
        n = frame[1] & 0x7F
        start = 2 if n < 126 else 4 if n == 126 else 10
        n = n if n < 126 else int.from_bytes(frame[2:start], "big")
        assert len(frame) == start + n and not frame[1] & 0x80  # one whole frame, not masked
        kinds.append((frame[0] & 0x0F, bool(frame[0] & 0x80)))
        payload += frame[start:]
    return kinds, payload


def test_a_long_message_is_fragmented_and_a_short_one_is_one_frame():
    long = b'{"x":"' + b"a" * 150_000 + b'"}'
    kinds, payload = parse_frames(text_message(long))
    assert (kinds, payload) == ([(1, False), (0, False), (0, True)], long)  # 64 KiB + 64 KiB + the rest
    for short in (b"{}", b"a" * 125, b"b" * 126, b"c" * 65_536):  # the three length encodings
        assert parse_frames(text_message(short)) == ([(1, True)], short)


def test_members_that_fell_behind_share_one_catch_up_per_generation():
    metrics = GatewayMetrics(registry=CollectorRegistry())
    reg = Registry(keep_gens=5)
    clients = [Client(conn=None, scope=None, metrics=metrics, initial=lambda flt: []) for _ in range(3)]
    for client in clients:
        client.subscriptions["map"] = group = reg.join(client, "map", Filter())
    for step in range(3):
        (_, update), = reg.updates({d: fix(d, step) for d in ("a", "b")} if step < 2 else {"c": fix("c", 2)})
        assert not any(client.offer("map", update) for client in clients)  # conn None: never writable
    messages = [client._next().message for client in clients]
    assert messages[0] is messages[1] is messages[2]
    assert metrics.registry.get_sample_value("gateway_updates_encoded_total") == 1
    _, payload = parse_frames(messages[0].frames()[0])
    doc = json.loads(payload)
    assert (doc["uid"], doc["event"], messages[0].gen, messages[0].size) == ("map", "update", 3, 3)
    assert {p["device_id"]: p["ts"] for p in doc["positions"]} == {
        "a": iso_ms(T0 + timedelta(seconds=1)), "b": iso_ms(T0 + timedelta(seconds=1)),
        "c": iso_ms(T0 + timedelta(seconds=2))}
    # the next generation encodes its own
    (_, update), = reg.updates({"d": fix("d", 3)})
    assert group.catch_up(0, lambda: []) is not messages[0]
    assert group.catch_up(2, lambda: []).size == 2  # c (generation 3) and d (4)


def test_a_compressed_message_inflates_to_the_message_on_its_own():
    """RFC 7692: no context takeover, so each message inflates alone (the sync flush's tail put back)."""
    payload = json.dumps({"positions": [{"device_id": f"d{i}", "speed": i % 7} for i in range(3000)]}).encode()
    frames = deflated_message(payload, 15)
    assert frames[0][0] & 0x40 and not any(f[0] & 0x40 for f in frames[1:])  # RSV1 on the first frame only
    kinds, data = parse_frames(frames)
    assert kinds[0] == (1, len(frames) == 1) and kinds[-1][1]
    assert len(data) * 5 < len(payload)
    inflater = zlib.decompressobj(-15)
    assert inflater.decompress(data + b"\x00\x00\xff\xff") == payload
