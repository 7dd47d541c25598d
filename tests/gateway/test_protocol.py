"""CONTRACT 9 with real WebSocket clients against a real gateway process, real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import time

import psycopg2
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.gateway.conftest import (ISSUER, SECRET, masked, open_client, raw_client, recv_json, subscribe,
                                    token, updates_until)
from tests.helpers import publish

from processor.gateway.auth import mint

# The gateway reads positions only for its snapshot, and the snapshot's test runs on both backends;
# the rest is the WebSocket side, the same whatever table is behind it (and the suite stays under
# ten minutes: issue 12).
pytestmark = pytest.mark.backends("plain")

NOW_MS = int(time.time() * 1000) // 1000 * 1000 - 60_000  # a minute ago, whole seconds


def position(device: str, ts_ms: int, lat: float = 54.0, lon: float = 25.0, **extra) -> bytes:
    return json.dumps({"device_id": device, "timestamp": ts_ms, "latitude": lat, "longitude": lon,
                       "speed": 10.5, "satellites": 7, **extra}).encode()


def iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000)) + f".{ts_ms % 1000:03d}Z"


def closed_with(ws, timeout: float = 10.0) -> int:
    """Read until the connection closes; its close code."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=deadline - time.monotonic())
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    raise AssertionError("still open")


# --- authentication -----------------------------------------------------------------------------

def test_auth_ok_by_message_and_by_query(start_gateway):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    assert subscribe(ws)["positions"] == []
    ws.close()
    ws = open_client(gw, query_token=token())
    assert recv_json(ws) == {"type": "auth", "status": "ok"}
    ws.close()


@pytest.mark.parametrize("bad, code, message", [
    (mint("another-secret-of-the-same-length-0000", issuer=ISSUER), "INVALID_CREDENTIALS",
     "Invalid token signature."),
    (mint(SECRET, issuer="someone-else"), "INVALID_CREDENTIALS", "Invalid token issuer."),
    (mint(SECRET, issuer=ISSUER, ttl_s=-60), "TOKEN_EXPIRED", "Token expired."),
    ("not.a.jwt", "INVALID_CREDENTIALS", "Invalid token."),
], ids=["bad-signature", "wrong-issuer", "expired", "garbage"])
def test_auth_refused(start_gateway, bad, code, message):
    gw = start_gateway()
    ws = open_client(gw)
    ws.send(json.dumps({"type": "auth", "access_token": bad}))
    assert recv_json(ws) == {"type": "auth", "status": "error", "error": {"code": code, "message": message}}
    assert closed_with(ws) == 1008
    ws = open_client(gw, query_token=bad)  # the same on the URL
    assert recv_json(ws)["error"]["code"] == code
    assert closed_with(ws) == 1008
    assert gw.metric(f'gateway_auth_failures_total{{code="{code}"}}') == 2


def test_auth_missing_closes_after_5_seconds(start_gateway):
    gw = start_gateway()
    ws = open_client(gw)
    started = time.monotonic()
    reply = recv_json(ws, timeout=10)
    waited = time.monotonic() - started
    assert reply == {"type": "auth", "status": "error",
                     "error": {"code": "INVALID_CREDENTIALS", "message": "No auth message within 5 s."}}
    assert 4.5 <= waited  # not before the 5 s
    assert closed_with(ws) == 1008
    # Subscribing first is refused at once.
    ws = open_client(gw)
    ws.send(json.dumps({"type": "subscribe", "uid": "x"}))
    assert recv_json(ws)["error"]["code"] == "INVALID_CREDENTIALS"
    assert closed_with(ws) == 1008


def test_public_mode_needs_no_token(start_gateway, redis_client, keys):
    gw = start_gateway(GATEWAY_PUBLIC="true", GATEWAY_TOKEN_SECRET="")
    ws = open_client(gw)
    subscribe(ws)
    publish(redis_client, keys["stream"], [position("p1", NOW_MS)])
    _, latest = updates_until(ws, lambda got: "p1" in got)
    assert latest["p1"]["ts"] == iso(NOW_MS)


def test_no_secret_and_not_public_exits_2(gateway_env):
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**gateway_env, "GATEWAY_TOKEN_SECRET": ""}
    result = subprocess.run([sys.executable, str(ROOT / "processor.py"), "gateway"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "telemetry-processor gateway: GATEWAY_TOKEN_SECRET must be set (the HS256 key Directus signs tokens with) "
        "unless GATEWAY_PUBLIC=true"]
    result = subprocess.run([sys.executable, str(ROOT / "processor.py"), "gateway"],
                            env={**gateway_env, "GATEWAY_FLUSH_MS": "soon"}, capture_output=True, text=True,
                            timeout=30)
    assert (result.returncode, result.stderr.strip()) == (
        2, "telemetry-processor gateway: GATEWAY_FLUSH_MS must be a positive integer (milliseconds), got 'soon'")


def test_origin_check(start_gateway):
    gw = start_gateway()
    with pytest.raises(InvalidStatus) as refused:
        open_client(gw, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    open_client(gw, origin=f"http://127.0.0.1:{gw.port}", auth=token()).close()  # same origin
    gw2 = start_gateway(GATEWAY_ALLOWED_ORIGINS="https://map.example.com, https://other.example.com/")
    open_client(gw2, origin="https://map.example.com", auth=token()).close()
    with pytest.raises(InvalidStatus):
        open_client(gw2, origin=f"http://127.0.0.1:{gw2.port}")
    assert gw2.metric('gateway_connections_refused_total{reason="origin"}') == 1


# --- subscriptions ------------------------------------------------------------------------------

def test_subscribe_all_devices_and_bbox(start_gateway, redis_client, keys):
    gw = start_gateway()
    everything, two, box = (open_client(gw, auth=token()) for _ in range(3))
    subscribe(everything, "all")
    subscribe(two, "two", devices=["a", "c"])
    subscribe(box, "box", bbox=[24.0, 53.0, 26.0, 55.0])  # around (25, 54)
    publish(redis_client, keys["stream"], [position("a", NOW_MS, 54.0, 25.0), position("b", NOW_MS, 54.5, 25.5),
                                           position("c", NOW_MS, 10.0, 10.0), position("d", NOW_MS, 40.0, -3.0)])
    _, got_all = updates_until(everything, lambda got: len(got) == 4)
    assert sorted(got_all) == ["a", "b", "c", "d"]
    _, got_two = updates_until(two, lambda got: len(got) == 2)
    _, got_box = updates_until(box, lambda got: len(got) == 2)
    assert (sorted(got_two), sorted(got_box)) == (["a", "c"], ["a", "b"])
    # a device moving out of the box is not sent to it any more; into it, it is
    publish(redis_client, keys["stream"], [position("a", NOW_MS + 1000, 10.0, 10.0),
                                           position("d", NOW_MS + 1000, 54.2, 25.2)])
    messages, got = updates_until(box, lambda got: "d" in got)
    assert [p["device_id"] for m in messages for p in m["positions"]] == ["d"]
    # an init holds each matching device's latest position
    late = open_client(gw, auth=token())
    init = subscribe(late, "box2", bbox=[24.0, 53.0, 26.0, 55.0])
    assert sorted(p["device_id"] for p in init["positions"]) == ["b", "d"]
    # the position's shape (CONTRACT 9)
    assert got_all["a"] == {"device_id": "a", "ts": iso(NOW_MS), "latitude": 54.0, "longitude": 25.0,
                            "altitude": None, "angle": None, "speed": 10.5, "satellites": 7, "attributes": {}}
    # unsubscribe: nothing more comes (after the update of "a" moving, already on its way)
    updates_until(two, lambda got: "a" in got)
    two.send(json.dumps({"type": "unsubscribe", "uid": "two"}))
    publish(redis_client, keys["stream"], [position("c", NOW_MS + 2000)])
    updates_until(everything, lambda got: got.get("c", {}).get("ts") == iso(NOW_MS + 2000))
    with pytest.raises(TimeoutError):
        two.recv(timeout=0.5)
    # one encoding per distinct subscription: clients sharing a uid and a filter share it
    assert gw.metric("gateway_subscription_groups") == 3  # all, box, box2 (two has gone)


def test_clients_of_one_subscription_share_one_encoding(start_gateway, redis_client, keys):
    gw = start_gateway(GATEWAY_FLUSH_MS="300")
    clients = [open_client(gw, auth=token()) for _ in range(5)]
    for ws in clients:
        subscribe(ws, "map")
    assert gw.metric("gateway_subscription_groups") == 1
    publish(redis_client, keys["stream"], [position("x", NOW_MS)], chunk=1)
    for ws in clients:
        updates_until(ws, lambda got: "x" in got)
    assert gw.metric("gateway_updates_encoded_total") == 1
    assert gw.metric("gateway_updates_sent_total") == 10  # 5 inits, 5 updates


def test_sentinels_arrive_decoded(start_gateway, redis_client, keys):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    subscribe(ws)
    attrs = {"16": {"__bigint": "9007199254740993"}, "21": {"__buffer": "AQI="}, "1": 1}
    publish(redis_client, keys["stream"], [position("s", NOW_MS, attributes=attrs), b"{not json"])
    _, got = updates_until(ws, lambda got: "s" in got)
    assert got["s"]["attributes"] == {"16": "9007199254740993", "21": "0102", "1": 1}
    assert gw.metric('gateway_entries_rejected_total{reason="invalid_json"}') == 1


# --- coalescing and forward-only --------------------------------------------------------------------

def test_1000_positions_of_one_device_give_one_update(start_gateway, redis_client, keys):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    subscribe(ws)
    pipe = redis_client.pipeline(transaction=True)  # one MULTI: the reader sees all 1,000 in one XREAD
    for i in range(1000):
        pipe.xadd(keys["stream"], {"payload": position("busy", NOW_MS + i, 54.0 + i / 1e5)})
    started = time.perf_counter()
    pipe.execute()
    published_in = time.perf_counter() - started
    messages, got = updates_until(ws, lambda got: "busy" in got)
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.5)  # and nothing after it
    assert len(messages) == 1 and len(messages[0]["positions"]) == 1
    assert got["busy"]["ts"] == iso(NOW_MS + 999) and got["busy"]["latitude"] == pytest.approx(54.00999)
    assert gw.metric('gateway_positions_coalesced_total{where="flush"}') == 999
    print(f"1,000 positions published in {published_in * 1000:.1f} ms: one update")


@pytest.mark.parametrize("compression", ["deflate", None])
def test_an_update_longer_than_a_fragment_arrives_whole(start_gateway, redis_client, keys, compression):
    """600 devices in one flush, about 300 KB (160 KB compressed: random attributes), written as fragments of
    64 KiB, compressed once for the clients that negotiated permessage-deflate; the client gets one message."""
    gw = start_gateway()
    ws = open_client(gw, auth=token(), compression=compression)
    assert [type(e).__name__ for e in ws.protocol.extensions] == (["PerMessageDeflate"] if compression else [])
    subscribe(ws)
    pipe = redis_client.pipeline(transaction=True)  # one MULTI: one XREAD, one flush
    for i in range(600):
        pipe.xadd(keys["stream"], {"payload": position(f"frag{i:03d}", NOW_MS + i,
                                                       attributes={"noise": os.urandom(160).hex()})})
    pipe.execute()
    raw = ws.recv(timeout=10)
    message = json.loads(raw)
    assert len(raw) > 4 * 64 * 1024 and message["event"] == "update"
    assert sorted(p["device_id"] for p in message["positions"]) == [f"frag{i:03d}" for i in range(600)]
    assert gw.metric("gateway_updates_encoded_total") == 1
    sent = gw.metric("gateway_bytes_sent_total")  # the init's and the update's frames
    assert (64 * 1024 < sent < 0.7 * len(raw)) if compression else sent > len(raw)


def test_forward_only(start_gateway, redis_client, keys):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    subscribe(ws)
    publish(redis_client, keys["stream"], [position("f", NOW_MS + 5000, 1.0, 1.0)])
    updates_until(ws, lambda got: "f" in got)
    publish(redis_client, keys["stream"], [position("f", NOW_MS, 2.0, 2.0), position("f", NOW_MS + 5000, 3.0, 3.0)])
    with pytest.raises(TimeoutError):
        ws.recv(timeout=1.0)  # older, then as old: no update
    assert gw.metric("gateway_positions_stale_total") == 2
    publish(redis_client, keys["stream"], [position("f", NOW_MS + 6000, 4.0, 4.0)])
    _, got = updates_until(ws, lambda got: "f" in got)
    assert (got["f"]["latitude"], got["f"]["ts"]) == (4.0, iso(NOW_MS + 6000))


@pytest.mark.backends("plain", "timescaledb")  # the snapshot reads positions
def test_init_holds_the_stored_latest_positions_after_a_restart(start_gateway, redis_client, keys, pg_url):
    conn = psycopg2.connect(pg_url)
    with conn, conn.cursor() as cur:
        rows = [("r1", NOW_MS - 10_000, 1.5), ("r1", NOW_MS, 2.5), ("r2", NOW_MS - 5_000, 3.5),
                ("old", NOW_MS - 48 * 3600_000, 9.0)]  # "old": outside GATEWAY_SNAPSHOT_HOURS (24)
        for device, ts_ms, lat in rows:
            cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude, speed, attributes) "
                        "VALUES (%s, to_timestamp(%s / 1000.0), %s, 25.0, 12.3, %s)",
                        (device, ts_ms, lat, json.dumps({"239": 1, "nested": {"a": [1, 2]}})))
    conn.close()
    gw = start_gateway()
    init = subscribe(open_client(gw, auth=token()))
    by_device = {p["device_id"]: p for p in init["positions"]}
    assert sorted(by_device) == ["r1", "r2"]
    assert by_device["r1"] == {"device_id": "r1", "ts": iso(NOW_MS), "latitude": 2.5, "longitude": 25.0,
                               "altitude": None, "angle": None, "speed": 12.3, "satellites": None,
                               "attributes": {"239": 1, "nested": {"a": [1, 2]}}}
    # A position published while the gateway runs moves r2; stored by the processor, it is in the next init.
    publish(redis_client, keys["stream"], [position("r2", NOW_MS + 1000, 4.5)])
    assert gw.stop() == 0
    conn = psycopg2.connect(pg_url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude) "
                    "VALUES ('r2', to_timestamp(%s / 1000.0), 4.5, 25.0)", (NOW_MS + 1000,))
    conn.close()
    gw = start_gateway()
    init = subscribe(open_client(gw, auth=token()))
    assert {p["device_id"]: p["latitude"] for p in init["positions"]} == {"r1": 2.5, "r2": 4.5}
    assert gw.metric("gateway_snapshot_positions") == 2


# --- bad input and limits ---------------------------------------------------------------------------

def test_bad_json_and_unknown_types_keep_the_connection(start_gateway):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    for frame, starts in [("{oops", "not JSON"), ('{"type":"dance"}', "unknown message type 'dance'"),
                          ("[1, 2]", "a message is a JSON object"),
                          ('{"type":"subscribe","uid":"b","bbox":[1,2,3]}', "bbox must be")]:
        ws.send(frame)
        reply = recv_json(ws)
        assert reply["type"] == "error" and reply["error"]["code"] == "INVALID_PAYLOAD", reply
        assert reply["error"]["message"].startswith(starts), reply
    subscribe(ws)  # still open and working
    assert gw.metric("gateway_invalid_messages_total") == 4


def test_replies_never_fall_inside_a_fragmented_update(start_gateway, redis_client, keys):
    """A client that does not read while 1-2 MB updates flow in fragments (10 MB: more than the sockets'
    buffers hold), and sends pings meanwhile: then every frame it reads keeps RFC 6455 5.4 (after a frame
    without FIN, only continuations and control frames until the FIN), and every pong and update comes."""
    rounds, devices = 5, 2000
    gw = start_gateway()
    sock = raw_client(gw.port, token())
    sock.sendall(masked(json.dumps({"type": "subscribe", "uid": "map"}).encode()))
    for rnd in range(rounds):
        pipe = redis_client.pipeline(transaction=True)
        for i in range(devices):
            pipe.xadd(keys["stream"], {"payload": position(f"frag{i:04d}", NOW_MS + rnd * 1000 + i % 1000,
                                                           attributes={"noise": os.urandom(400).hex()})})
        pipe.execute()
        for _ in range(4):
            sock.sendall(masked(b'{"type":"ping"}'))
        time.sleep(0.2)
    kinds, messages = [], []
    reader = sock.makefile("rb")
    latest: dict[str, str] = {}
    parts: list[bytes] = []
    while sum(m.get("type") == "pong" for m in messages) < 4 * rounds or len(latest) < devices \
            or min(latest.values()) != iso(NOW_MS + (rounds - 1) * 1000):
        b0, b1 = reader.read(2)
        n = b1 & 0x7F
        n = n if n < 126 else int.from_bytes(reader.read(2 if n == 126 else 8), "big")
        payload = reader.read(n)
        kind = b0 & 0x0F
        assert not b0 & 0x40, "compression was not negotiated"
        if parts:
            assert kind in (0, 8, 9, 10), f"a {kind} frame inside a fragmented message"
        elif kind == 0:
            raise AssertionError("a continuation without a message")
        kinds.append(kind)
        if kind in (0, 1):
            parts.append(payload)
            if b0 & 0x80:
                messages.append(json.loads(b"".join(parts)))
                parts = []
                latest.update((p["device_id"], p["ts"]) for p in messages[-1].get("positions", ()))
    assert kinds.count(0) > rounds  # fragmented updates did come
    assert gw.metric("gateway_clients") == 1


def test_a_100_kib_frame_closes_with_1009(start_gateway):
    gw = start_gateway()
    ws = open_client(gw, auth=token())
    ws.send(json.dumps({"type": "subscribe", "uid": "big", "devices": ["x" * 100] * 1024}))  # about 100 KiB
    assert closed_with(ws) == 1009
    open_client(gw, auth=token()).close()  # the gateway is fine


def test_the_client_limit_refuses_with_1013(start_gateway):
    gw = start_gateway(GATEWAY_MAX_CLIENTS="2")
    first, second = open_client(gw, auth=token()), open_client(gw, auth=token())
    third = open_client(gw)
    assert closed_with(third) == 1013
    assert gw.metric('gateway_connections_refused_total{reason="max_clients"}') == 1
    first.close()
    time.sleep(0.3)
    subscribe(open_client(gw, auth=token()))  # a place is free again
    second.close()


# --- HTTP and the stop ------------------------------------------------------------------------------

def test_http_endpoints_and_clean_stop(start_gateway):
    gw = start_gateway(GATEWAY_TILE_URL="https://tile.example.org/{z}/{x}/{y}.png")
    status, page = gw.get("/")
    assert status == 200 and "<canvas" in page and '"tileUrl":"https://tile.example.org/{z}/{x}/{y}.png"' in page
    assert gw.get("/healthz") == (200, "ok\n")
    assert gw.get("/readyz") == (200, "ok\n")
    status, metrics = gw.get("/metrics")
    for name in ("gateway_clients", "gateway_subscriptions", "gateway_updates_sent_total",
                 "gateway_positions_sent_total", "gateway_bytes_sent_total", "gateway_positions_coalesced_total",
                 "gateway_slow_clients_closed_total", "gateway_stream_lag_seconds",
                 "gateway_entry_to_send_seconds_bucket", "gateway_ready 1.0"):
        assert name in metrics, name
    assert gw.get("/nothing")[0] == 404
    ws = open_client(gw, auth=token())
    assert gw.stop() == 0
    assert closed_with(ws) == 1001
    assert "gateway stopped" in gw.log()
    assert SECRET not in gw.log()
