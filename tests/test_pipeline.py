"""The throughput pipeline end to end, against real Redis and PostgreSQL (issue 3)."""

from __future__ import annotations

import json
import sys

import psycopg2
import pytest

from processor.core.pipeline import SWITCH_INTERVAL_S
from tests.helpers import (BASE_MS, InProcessService, config_for, dead_letters, payload, pending_count,
                           publish, row_count, wait_until)


def _fleet(n: int, devices: int, base_ms: int = BASE_MS) -> list[bytes]:
    return [payload(f"dev{i % devices:05d}", base_ms + (i // devices) * 1000, speed=float(i % 120))
            for i in range(n)]


def _settled(client, keys, pg_url, expected_rows):
    return row_count(pg_url) == expected_rows and pending_count(client, keys["stream"], keys["group"]) == 0


@pytest.mark.slow
def test_100k_positions_from_10k_devices_exactly_once(redis_url, redis_client, pg_url, keys):
    payloads = _fleet(100_000, 10_000)
    publish(redis_client, keys["stream"], payloads)
    config = config_for(redis_url, pg_url, keys)
    with InProcessService(config) as svc:
        wait_until(lambda: _settled(redis_client, keys, pg_url, 100_000), 120, 0.2, "100,000 rows")
        assert len(svc.service.state) == 10_000
        # The same 100,000 again: no new row, nothing left pending, every one a duplicate.
        publish(redis_client, keys["stream"], payloads)
        wait_until(lambda: svc.sample("processor_records_written_total", {"status": "duplicate"}) == 100_000,
                   120, 0.2, "100,000 duplicates")
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 10)
        assert row_count(pg_url) == 100_000
        assert svc.sample("processor_records_written_total", {"status": "inserted"}) == 100_000
        assert svc.sample("processor_acks_total") == 200_000
    assert svc.exit_code == 0
    assert redis_client.xlen(keys["dead"]) == 0


def test_sentinels_arrive_in_attributes_as_the_contract_says(redis_url, redis_client, pg_url, keys):
    attrs = {
        "21": 5, "66": 12.5, "239": True, "240": None, "11": "ICCID-text",
        "78": {"__bigint": str(2**53 - 1)}, "79": {"__bigint": str(2**53)}, "80": {"__bigint": "-" + str(2**63)},
        "100": {"__buffer": "3q2+7w=="}, "101": {"type": "Buffer", "data": [0, 1, 254, 255]},
        "nested": {"a": [{"__bigint": "18446744073709551615"}, {"__buffer": "AA=="}], "b": {"c": {"__bigint": "7"}}},
    }
    publish(redis_client, keys["stream"], [payload("sentinel-dev", BASE_MS, attributes=attrs)])
    with InProcessService(config_for(redis_url, pg_url, keys)):
        wait_until(lambda: _settled(redis_client, keys, pg_url, 1), 30)
    conn = psycopg2.connect(pg_url)
    with conn.cursor() as cur:
        cur.execute("""SELECT attributes->'78', jsonb_typeof(attributes->'78'), attributes->'79',
                              jsonb_typeof(attributes->'79'), attributes->>'80', attributes->>'100',
                              attributes->>'101', attributes#>>'{nested,a,0}', attributes#>>'{nested,a,1}',
                              attributes#>'{nested,b,c}', attributes->'239', attributes->'240', attributes->'66'
                       FROM positions""")
        row = cur.fetchone()
    conn.close()
    assert row == (2**53 - 1, "number", str(2**53), "string", "-" + str(2**63), "deadbeef", "0001feff",
                   "18446744073709551615", "00", 7, True, None, 12.5)


def test_a_row_the_database_rejects_does_not_sink_its_batch(redis_url, redis_client, pg_url, pg_conn, keys):
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_bad_device CHECK (device_id <> 'bad')")
    payloads = _fleet(1000, 100)
    payloads[500] = payload("bad", BASE_MS + 5)
    publish(redis_client, keys["stream"], payloads)
    config = config_for(redis_url, pg_url, keys, batch_size=1000, reclaim_idle_ms=3_600_000)
    with InProcessService(config) as svc:
        wait_until(lambda: row_count(pg_url) == 999 and pending_count(redis_client, keys["stream"], keys["group"]) == 1,
                   30, message="999 rows and 1 pending")
        # Acknowledgements ride on the next read and are counted when its reply is back: a moment after XACK.
        wait_until(lambda: svc.sample("processor_acks_total") == 999, 10, message="999 acknowledgements counted")
        assert svc.sample("processor_records_written_total", {"status": "failed"}) == 1
    pending = redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 10)
    assert len(pending) == 1
    entry = redis_client.xrange(keys["stream"], pending[0]["message_id"], pending[0]["message_id"])
    assert json.loads(entry[0][1][b"payload"])["device_id"] == "bad"
    assert redis_client.xlen(keys["dead"]) == 0  # not yet: delivered once, MAX_DELIVERIES is 5


def test_out_of_order_positions_leave_the_newest_as_last_position(redis_url, redis_client, pg_url, keys):
    times = [BASE_MS + 5000, BASE_MS + 1000, BASE_MS + 9000, BASE_MS + 3000]
    publish(redis_client, keys["stream"], [payload("ooo", t, speed=float(i)) for i, t in enumerate(times)])
    with InProcessService(config_for(redis_url, pg_url, keys)) as svc:
        wait_until(lambda: _settled(redis_client, keys, pg_url, 4), 30)
        info = svc.service.state.get("ooo")
    assert info is not None
    assert info.position_count_session == 4
    assert int(info.last_position.ts.timestamp() * 1000) == BASE_MS + 9000
    assert info.last_position.speed == 2.0


def test_device_state_is_bounded_by_device_state_max(redis_url, redis_client, pg_url, keys):
    publish(redis_client, keys["stream"], _fleet(1000, 1000))
    config = config_for(redis_url, pg_url, keys, device_state_max=100)
    with InProcessService(config) as svc:
        wait_until(lambda: _settled(redis_client, keys, pg_url, 1000), 30)
        assert len(svc.service.state) == 100
        # the LRU keeps the 100 most recently seen
        assert set(svc.service.state.snapshot()) == {f"dev{i:05d}" for i in range(900, 1000)}
        svc.service.monitor.refresh()
        assert svc.sample("processor_devices_tracked") == 100


def test_rejections_are_dead_lettered_and_acknowledged_at_once(redis_url, redis_client, pg_url, keys):
    publish(redis_client, keys["stream"], [payload("ok-1"), b"{not json", payload("ok-2", latitude=91.0)])
    with InProcessService(config_for(redis_url, pg_url, keys)) as svc:
        wait_until(lambda: redis_client.xlen(keys["dead"]) == 2 and row_count(pg_url) == 1, 30)
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 10)
        assert svc.sample("processor_records_dead_lettered_total", {"reason": "invalid_json"}) == 1
        assert svc.sample("processor_records_dead_lettered_total", {"reason": "out_of_range"}) == 1
    letters = dead_letters(redis_client, keys["dead"])
    assert [d["reason"] for d in letters] == [b"invalid_json", b"out_of_range"]
    assert letters[0]["payload"] == b"{not json"
    assert set(letters[0]) == {"payload", "reason", "detail", "source_stream", "source_id", "group",
                               "deliveries", "dead_lettered_at"}
    assert letters[0]["source_stream"].decode() == keys["stream"]
    assert letters[0]["group"].decode() == keys["group"]
    assert letters[0]["deliveries"] == b"1"


def test_pending_stops_growing_at_the_inflight_bound_while_postgres_cannot_write(
        redis_url, redis_client, pg_url, keys):
    blocker = psycopg2.connect(pg_url)
    cur = blocker.cursor()
    cur.execute("LOCK TABLE positions IN EXCLUSIVE MODE")  # blocks writes, not reads; held until rollback
    publish(redis_client, keys["stream"], _fleet(3000, 50))
    config = config_for(redis_url, pg_url, keys, batch_size=100, max_inflight_batches=3)
    with InProcessService(config):
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 300, 30)
        import time
        time.sleep(1.5)  # several BLOCK_MS turns: it must not read further
        assert pending_count(redis_client, keys["stream"], keys["group"]) == 300
        assert row_count(pg_url) == 0
        blocker.rollback()
        wait_until(lambda: _settled(redis_client, keys, pg_url, 3000), 60)
    blocker.close()


def test_no_reclaim_while_postgres_is_down_so_delivery_counts_stay_put(
        redis_url, redis_client, throwaway_postgres, keys):
    # Below the in-flight bound, so the loop keeps turning (and would reclaim) while the writes wait.
    config = config_for(redis_url, throwaway_postgres.url, keys, batch_size=50, max_inflight_batches=10,
                        reclaim_idle_ms=300)
    with InProcessService(config, monitor_interval_s=0.2) as svc:
        throwaway_postgres.stop()
        publish(redis_client, keys["stream"], _fleet(100, 10))
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 100, 30)
        wait_until(lambda: not svc.service.health.ready()[0], 10, message="not ready")
        import time
        time.sleep(3)  # ten RECLAIM_IDLE_MS: before the fix, every turn claimed the idle in-flight entries
        counts = {r["times_delivered"] for r in
                  redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 200)}
        assert counts == {1}
        assert svc.sample("processor_reclaimed_total") == 0
        throwaway_postgres.start()
        wait_until(lambda: _settled(redis_client, keys, throwaway_postgres.url, 100), 60)
    assert svc.exit_code == 0


def test_the_running_service_hands_the_gil_over_every_millisecond(redis_url, redis_client, pg_url, keys):
    assert SWITCH_INTERVAL_S == 0.001
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # Python's default, whatever an earlier test left
    try:
        with InProcessService(config_for(redis_url, pg_url, keys)) as svc:
            publish(redis_client, keys["stream"], _fleet(10, 2))
            wait_until(lambda: _settled(redis_client, keys, pg_url, 10), 30)
            assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)
    assert svc.exit_code == 0
